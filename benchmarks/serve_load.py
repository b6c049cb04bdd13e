"""Benchmark: the anytime server against the feed-forward (final-exit) server under overload, over real HTTP.

    python benchmarks/serve_load.py --run-dir RUN --deadline-ms 100 --seconds 20

0. The scheduler alone (no HTTP, preprocessed tensors submitted in this process): the final-exit throughput with
   ``--clients`` closed-loop clients (the model's own capacity), and one client's latency.
1. Saturation: ``cascadenet serve --mode final`` (every request to the last step) is driven by ``--clients``
   closed-loop clients (each sends its next request when the previous one is answered) for ``--seconds``; the
   completed requests per second are the rate at which it saturates. One client's latency, against the
   scheduler alone's, is the per-request overhead of HTTP, decoding and the client.
2. Overload: each mode (``final``, ``anytime``) is started afresh and driven open-loop at ``--overload`` times that
   rate for ``--seconds``, both by the same arrival trace (Poisson arrivals drawn from ``--seed``), each request
   with ``deadline_ms``. Latency is measured from the request's scheduled arrival to its answer (so a client
   that falls behind counts against the server, not for it); a miss is an answer later than the deadline, or
   none (a 503: the server answered at once that it could not make it). Accuracy is over the answered
   requests, against the labels of the run's test images (PNG-encoded, sent as request bodies).

The servers run in their own process (``--threads`` PyTorch threads). The client is a small asyncio HTTP/1.1
client in this process: keep-alive connections opened before the clock starts and requests encoded before it
(round 1's httpx client cost more CPU per request than the model). ``--no-http`` runs the scheduler alone at the
overload too. Prints markdown tables and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

import cascadenet as cn
from cascadenet.runs.load import load_run


class Connection:
    """One HTTP/1.1 keep-alive connection over asyncio streams: pre-encoded requests, one at a time (no httpx:
    its per-request cost in Python was what saturated round 1's benchmark, not the model)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        writer.transport.set_write_buffer_limits(high=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one pre-encoded request; the response's status and body."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def encode(path: str, body: bytes, port: int) -> bytes:
    """A whole POST request, headers and body, ready to write to a socket."""
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/octet-stream\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _health(port: int) -> dict | None:
    """The server's ``/health`` answer (None: not up)."""
    try:
        conn = await Connection.open("127.0.0.1", port)
    except OSError:
        return None
    try:
        conn.writer.write(f"GET /health HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = await conn.reader.readuntil(b"\r\n\r\n")
        length = next(int(h[15:]) for h in head.split(b"\r\n") if h[:15].lower() == b"content-length:")
        body = await conn.reader.readexactly(length)
        return json.loads(body) if head[9:12] == b"200" else None
    except (OSError, asyncio.IncompleteReadError, StopIteration):
        return None
    finally:
        conn.close()


def start(args, mode: str, round_share: float = 0.5) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "cascadenet", "serve", args.run_dir, "--port", str(port), "--mode", mode,
           "--deadline-ms", str(args.deadline_ms), "--threads", str(args.threads), "--device", "cpu",
           "--max-batch", str(args.max_batch), "--margin-ms", str(args.margin_ms),
           "--round-share", str(round_share)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(1200):
        if asyncio.run(_health(port)) is not None:
            return proc, port
        if proc.poll() is not None:
            raise SystemExit(f"server failed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    raise SystemExit("server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def closed_loop(port: int, requests: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` connections each sending its next request when the previous one is answered: requests/s, the
    mean latency, and the mean time of a request outside the server's handler (HTTP and the client)."""
    conns = [await Connection.open("127.0.0.1", port) for _ in range(clients)]
    done, busy, outside = 0, 0.0, 0.0
    end = time.perf_counter() + seconds

    async def client(conn: Connection, i: int) -> None:
        nonlocal done, busy, outside
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            status, body = await conn.send(requests[i % len(requests)])
            took = time.perf_counter() - t0
            if status == 200:
                done += 1
                busy += took
                outside += took - json.loads(body)["ms"] / 1e3
            i += clients

    start = time.perf_counter()
    await asyncio.gather(*(client(c, i) for i, c in enumerate(conns)))
    wall = time.perf_counter() - start
    for c in conns:
        c.close()
    n = max(done, 1)
    return {"throughput": done / wall, "latency_ms": 1e3 * busy / n, "outside_ms": 1e3 * outside / n}


def arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival times in ``[0, seconds)``: the same trace for every mode."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def open_loop(port: int, requests: list[bytes], labels: list[int], trace: list[float], deadline_ms: float,
                    connections: int) -> list[tuple[float, int, dict | None, int]]:  # fmt: skip
    """Each request sent at its arrival time in ``trace`` on an idle keep-alive connection (a new one when none
    is idle); ``(latency ms from the scheduled arrival, status, answer, label)`` per request."""
    idle = [await Connection.open("127.0.0.1", port) for _ in range(connections)]
    opened = len(idle)
    results: list[tuple[float, int, dict | None, int]] = []

    async def one(i: int, due: float) -> None:
        nonlocal opened
        if idle:
            conn = idle.pop()
        else:
            conn = await Connection.open("127.0.0.1", port)
            opened += 1
        status, body = 0, b""
        for attempt in range(2):  # a kept-alive connection the server has closed meanwhile: once more on a new one
            try:
                status, body = await conn.send(requests[i % len(requests)])
                idle.append(conn)
                break
            except (OSError, asyncio.IncompleteReadError, ValueError):
                conn.close()
                if attempt == 0:
                    conn = await Connection.open("127.0.0.1", port)
                    opened += 1
        answer = json.loads(body) if status == 200 else None
        results.append((1e3 * (time.perf_counter() - due), status, answer, labels[i % len(labels)]))

    tasks = []
    start = time.perf_counter()
    for i, t in enumerate(trace):
        due = start + t
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    for c in idle:
        c.close()
    if opened > connections:
        print(f"(the client opened {opened - connections} connections beyond its {connections})", flush=True)
    return results


def summary(records: list[tuple[float, int, dict | None, int]], rate: float, deadline_ms: float) -> dict:
    latencies = sorted(ms for ms, _, _, _ in records)
    answered = [(a, y) for _, _, a, y in records if a is not None]
    return {
        "requests": len(records),
        "rate": rate,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "misses": sum(ms > deadline_ms or a is None for ms, _, a, _ in records) / len(records),
        "shed": sum(status == 503 for _, status, _, _ in records),
        "errors": sum(status not in (200, 503) for _, status, _, _ in records),
        "statuses": sorted(collections.Counter(status for _, status, _, _ in records).items()),
        "accuracy": sum(a["label"] == y for a, y in answered) / max(len(answered), 1),
        "mean_exit": statistics.mean(a["exit"] for a, _ in answered) if answered else float("nan"),
        "mean_batch": statistics.mean(a["batch"] for a, _ in answered) if answered else float("nan"),
        # the server's own view: the time from the handler's start to the answer, and its misses; the rest of a
        # request's latency is spent in HTTP, the event loops and the client
        "server_misses": sum(not a["deadline_met"] for a, _ in answered) / len(records),
        "server_p99_ms": sorted(a["ms"] for a, _ in answered)[int(0.99 * len(answered))] if answered else None,
        "outside_p50_ms": statistics.median(ms - a["ms"] for ms, _, a, _ in records if a) if answered else None,
        "outside_p99_ms": sorted(ms - a["ms"] for ms, _, a, _ in records if a)[int(0.99 * len(answered))]
        if answered
        else None,
    }


def scheduler_load(args, loaded, mode: str, rate: float | None, seconds: float, clients: int) -> dict:
    """The scheduler alone, without HTTP (preprocessed tensors submitted in this process): closed loop of
    ``clients`` threads when ``rate`` is None (the throughput and mean latency), else open-loop arrivals."""
    import threading

    import torch

    import cascadenet as cn
    from cascadenet.deployment.server import DeadlineError, Scheduler

    torch.set_num_threads(args.threads)
    model = cn.load_model(args.run_dir)
    xs = model.preprocess(loaded.data.images[: args.images])
    labels = loaded.data.labels[: args.images].tolist()
    n = len(labels)
    scheduler = Scheduler(model, mode=mode, max_batch=args.max_batch, example=xs[0], margin=args.margin_ms / 1e3,
                          round_share=args.round_share[0])  # fmt: skip
    lock = threading.Lock()
    records: list[tuple[float, int, dict | None, int]] = []
    try:
        if rate is None:
            end = time.perf_counter() + seconds
            done, busy = [0], [0.0]

            def client(i: int) -> None:
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    scheduler.submit(xs[i % len(xs)], 1e3).result()
                    with lock:
                        done[0] += 1
                        busy[0] += time.perf_counter() - t0
                    i += clients

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return {"throughput": done[0] / (time.perf_counter() - start), "latency_ms": 1e3 * busy[0] / done[0]}

        def record(f, due: float, y: int) -> None:
            try:
                answer, status = f.result(), 200
            except DeadlineError:
                answer, status = None, 503
            records.append((1e3 * (time.perf_counter() - due), status, answer, y))

        futures = []
        start = time.perf_counter()
        for i, t in enumerate(arrivals(rate, seconds, args.seed)):
            due = start + t
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            f = scheduler.submit(xs[i % n], args.deadline_ms / 1e3, due)
            f.add_done_callback(lambda f, due=due, y=labels[i % n]: record(f, due, y))
            futures.append(f)
        concurrent_wait(futures)
    finally:
        scheduler.close()
    return summary(records, rate, args.deadline_ms)


def concurrent_wait(futures: list) -> None:
    import concurrent.futures

    concurrent.futures.wait(futures)


def table(title: str, modes: dict) -> None:
    print(f"\n{title}\n")
    print("| server | requests | p50 ms | p99 ms | misses | of which 503 | accuracy | mean exit | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in modes.items():
        print(f"| {mode} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {100 * r['misses']:.2f}% | "
              f"{r['shed']} | {100 * r['accuracy']:.2f}% | {r['mean_exit']:.2f} | {r['mean_batch']:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients of the saturation runs")
    parser.add_argument("--connections", type=int, default=256, help="keep-alive connections of the open loop")
    parser.add_argument("--overload", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin-ms", type=float, default=10.0, help="the anytime server's --margin-ms")
    parser.add_argument("--round-share", type=float, nargs="+", default=[0.5],
                        help="the anytime server's --round-share (several: one server each, same trace)")  # fmt: skip
    parser.add_argument("--no-http", action="store_true", help="only the scheduler without HTTP")
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded = load_run(args.run_dir, device="cpu", split="test")
    images, labels = loaded.data.images[: args.images], loaded.data.labels[: args.images].tolist()
    bodies = []
    for im in images:
        arr = im.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    model = cn.load_model(args.run_dir)
    t0 = time.perf_counter()
    for b in bodies:
        model.preprocess(b)
    decode_ms = 1e3 * (time.perf_counter() - t0) / len(bodies)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown")  # fmt: skip
    out: dict = {"run": args.run_dir, "cpu": cpu, "cores": os.cpu_count(), "threads": args.threads,
                 "deadline_ms": args.deadline_ms, "seconds": args.seconds, "load_before": os.getloadavg(),
                 "decode_ms": decode_ms}  # fmt: skip
    # the scheduler alone: the model's own capacity, and one request's latency without HTTP
    scheduler_load(args, loaded, "final", None, 1.0, args.clients)  # warm-up
    alone = scheduler_load(args, loaded, "final", None, min(5.0, args.seconds), args.clients)
    out["scheduler_saturation_rps"] = alone["throughput"]
    out["scheduler_one_client_ms"] = scheduler_load(args, loaded, "final", None, 3.0, 1)["latency_ms"]
    print(f"scheduler alone: final-exit saturation {alone['throughput']:.1f} requests/s (batch compute "
          f"{1e3 / alone['throughput']:.2f} ms per request); one client {out['scheduler_one_client_ms']:.2f} ms",
          flush=True)  # fmt: skip
    if args.no_http:
        srate = args.overload * out["scheduler_saturation_rps"]
        out["scheduler"] = {
            m: scheduler_load(args, loaded, m, srate, args.seconds, args.clients) for m in ("final", "anytime")
        }
        table(f"scheduler without HTTP: {srate:.1f} requests/s ({args.overload:g}x the final-exit saturation of "
              f"{out['scheduler_saturation_rps']:.1f}/s) for {args.seconds:g} s, deadline {args.deadline_ms:g} ms",
              out["scheduler"])  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        return
    proc, port = start(args, "final")
    try:
        path = "/predict?deadline_ms=1000000"
        requests = [encode(path, b, port) for b in bodies]
        asyncio.run(closed_loop(port, requests, args.clients, min(3.0, args.seconds)))  # warm-up
        one = asyncio.run(closed_loop(port, requests, 1, 3.0))
        out["one_client_ms"], out["outside_ms"] = one["latency_ms"], one["outside_ms"]
        out["saturation_rps"] = asyncio.run(closed_loop(port, requests, args.clients, args.seconds))["throughput"]
    finally:
        stop(proc)
    print(f"over HTTP: final-exit saturation {out['saturation_rps']:.1f} requests/s; one client "
          f"{out['one_client_ms']:.2f} ms, of which {out['outside_ms']:.2f} ms outside the server's handler (HTTP "
          f"and the client) and {out['decode_ms']:.2f} ms decoding", flush=True)  # fmt: skip
    rate = args.overload * out["saturation_rps"]
    trace = arrivals(rate, args.seconds, args.seed)
    out["modes"] = {}
    servers = [("final", "final", 0.5)]
    servers += [("anytime" if len(args.round_share) == 1 else f"anytime, round share {share:g}", "anytime", share)
                for share in args.round_share]  # fmt: skip
    for name, mode, share in servers:
        proc, port = start(args, mode, share)
        try:
            path = f"/predict?deadline_ms={args.deadline_ms:g}"
            requests = [encode(path, b, port) for b in bodies]
            asyncio.run(closed_loop(port, requests, 4, 2.0))  # warm-up
            records = asyncio.run(open_loop(port, requests, labels, trace, args.deadline_ms, args.connections))
            out["modes"][name] = summary(records, rate, args.deadline_ms)
            out["modes"][name]["server"] = asyncio.run(_health(port))
        finally:
            stop(proc)
        print(name, json.dumps(out["modes"][name]), flush=True)
    out["load_after"] = os.getloadavg()
    table(
        f"over HTTP: {rate:.1f} requests/s ({args.overload:g}x the final-exit saturation of "
        f"{out['saturation_rps']:.1f}/s) for {args.seconds:g} s, deadline {args.deadline_ms:g} ms",
        out["modes"],
    )
    print(f"\n{args.run_dir}, {cpu}, {os.cpu_count()} cores, {args.threads} thread(s); load average before "
          f"{out['load_before'][0]:.2f}, after {out['load_after'][0]:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
