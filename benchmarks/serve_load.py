"""Benchmark: the anytime server against the feed-forward (final-exit) server under overload, over real HTTP.

    python benchmarks/serve_load.py --run-dir runs/demo/cascaded-td --deadline-ms 100 --seconds 20

1. Saturation: ``cascadenet serve --mode final`` (every request to the last step) is driven by ``--clients``
   closed-loop clients (each sends its next request when the previous one is answered) for ``--seconds``; the
   completed requests per second are the rate at which it saturates.
0. The scheduler alone (no HTTP, preprocessed tensors submitted in this process): the same two measurements,
   where the model is the bottleneck.
2. Overload: each mode (``final``, ``anytime``) is started afresh and driven open-loop at ``--overload`` times that
   rate (Poisson arrivals, each request with ``deadline_ms``), for ``--seconds``. Latency is measured by the client
   from sending to the answer; a miss is an answer later than the deadline (or none). Accuracy is over the
   answered requests, against the labels of the run's test images (PNG-encoded, sent as request bodies).

The servers run in their own process (``--threads`` PyTorch threads); the client is httpx with asyncio in this one.
Prints a markdown table and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
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

import httpx
from PIL import Image

from cascadenet.runs.load import load_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, mode: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "cascadenet", "serve", args.run_dir, "--port", str(port), "--mode", mode,
           "--deadline-ms", str(args.deadline_ms), "--threads", str(args.threads), "--device", "cpu",
           "--max-batch", str(args.max_batch)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
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


async def closed_loop(url: str, bodies: list, clients: int, seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient, i: int) -> None:
        nonlocal done
        while time.perf_counter() < end:
            await c.post(f"{url}/predict", content=bodies[i % len(bodies)][0], params={"deadline_ms": 1e6})
            done += 1
            i += clients

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        await asyncio.gather(*(client(c, i) for i in range(clients)))
    return done / (time.perf_counter() - start)


async def open_loop(url: str, bodies: list, rate: float, seconds: float, deadline_ms: float, seed: int) -> dict:
    rng = random.Random(seed)
    results: list[tuple[float, dict | None, int]] = []

    async def one(c: httpx.AsyncClient, i: int) -> None:
        body, label = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        try:
            r = await c.post(f"{url}/predict", content=body, params={"deadline_ms": deadline_ms})
            answer = r.json() if r.status_code == 200 else None
        except httpx.HTTPError:
            answer = None
        results.append((1e3 * (time.perf_counter() - t0), answer, label))

    tasks = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        start = time.perf_counter()
        t, i = 0.0, 0
        while t < seconds:
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(c, i)))
            i += 1
            t += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    latencies = sorted(ms for ms, _, _ in results)
    answered = [(a, y) for _, a, y in results if a is not None]
    exits = [a["exit"] for a, _ in answered]
    return {
        "requests": len(results),
        "rate": rate,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "misses": sum(ms > deadline_ms for ms, _, _ in results) / len(results),
        "errors": len(results) - len(answered),
        "accuracy": sum(a["label"] == y for a, y in answered) / max(len(answered), 1),
        "mean_exit": statistics.mean(exits) if exits else None,
        "mean_batch": statistics.mean(a["batch"] for a, _ in answered) if answered else None,
    }


def scheduler_load(args, loaded, mode: str, rate: float | None, seconds: float, seed: int) -> dict:
    """The scheduler alone, without HTTP (preprocessed tensors submitted in this process): closed loop of
    ``--clients`` when ``rate`` is None (returns the throughput), else open-loop Poisson arrivals at ``rate``."""
    import threading

    import torch

    import cascadenet as cn
    from cascadenet.deployment.server import Scheduler

    torch.set_num_threads(args.threads)
    model = cn.load_model(args.run_dir)
    xs = model.preprocess(loaded.data.images[: args.images])
    labels = loaded.data.labels[: args.images].tolist()
    n = len(labels)
    scheduler = Scheduler(model, mode=mode, max_batch=args.max_batch)
    lock = threading.Lock()
    records: list[tuple[float, dict, int]] = []
    try:
        if rate is None:
            end = time.perf_counter() + seconds
            done = [0]

            def client(i: int) -> None:
                while time.perf_counter() < end:
                    scheduler.submit(xs[i % len(xs)], 1e3).result()
                    with lock:
                        done[0] += 1
                    i += args.clients

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return {"throughput": done[0] / (time.perf_counter() - start)}
        rng = random.Random(seed)
        futures = []
        start = time.perf_counter()
        t, i = 0.0, 0
        while t < seconds:
            delay = start + t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent, label = time.perf_counter(), labels[i % n]
            f = scheduler.submit(xs[i % n], args.deadline_ms / 1e3, sent)
            f.add_done_callback(lambda f, sent=sent, y=label: records.append(
                (1e3 * (time.perf_counter() - sent), f.result(), y)))  # fmt: skip
            futures.append(f)
            i += 1
            t += rng.expovariate(rate)
        for f in futures:
            f.result()
    finally:
        scheduler.close()
    latencies = sorted(ms for ms, _, _ in records)
    return {
        "requests": len(records),
        "rate": rate,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "misses": sum(ms > args.deadline_ms for ms, _, _ in records) / len(records),
        "errors": 0,
        "accuracy": sum(a["label"] == y for _, a, y in records) / len(records),
        "mean_exit": statistics.mean(a["exit"] for _, a, _ in records),
        "mean_batch": statistics.mean(a["batch"] for _, a, _ in records),
    }


def table(title: str, modes: dict) -> None:
    print(f"\n{title}\n")
    print("| server | requests | p50 ms | p99 ms | deadline misses | accuracy | mean exit | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in modes.items():
        print(f"| {mode} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {100 * r['misses']:.1f}% | "
              f"{100 * r['accuracy']:.2f}% | {r['mean_exit']:.2f} | {r['mean_batch']:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--overload", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-http", action="store_true", help="only the scheduler without HTTP")
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded = load_run(args.run_dir, device="cpu")
    bodies = []
    for im, y in zip(loaded.data.images[: args.images], loaded.data.labels[: args.images].tolist()):
        arr = im.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buffer, format="PNG")
        bodies.append((buffer.getvalue(), y))
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown")  # fmt: skip
    out: dict = {"run": args.run_dir, "cpu": cpu, "cores": os.cpu_count(), "threads": args.threads,
                 "deadline_ms": args.deadline_ms, "seconds": args.seconds}  # fmt: skip
    # the scheduler alone: where the model, not the HTTP layer, is the bottleneck
    scheduler_load(args, loaded, "final", None, min(2.0, args.seconds), args.seed)  # warm-up
    out["scheduler_saturation_rps"] = scheduler_load(args, loaded, "final", None, args.seconds, args.seed)["throughput"]
    srate = args.overload * out["scheduler_saturation_rps"]
    out["scheduler"] = {
        m: scheduler_load(args, loaded, m, srate, args.seconds, args.seed) for m in ("final", "anytime")
    }
    table(f"scheduler without HTTP: {srate:.1f} requests/s ({args.overload:g}x the final-exit saturation of "
          f"{out['scheduler_saturation_rps']:.1f}/s) for {args.seconds:g} s, deadline {args.deadline_ms:g} ms",
          out["scheduler"])  # fmt: skip
    if args.no_http:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        return
    proc, url = start(args, "final")
    try:
        asyncio.run(closed_loop(url, bodies, args.clients, min(3.0, args.seconds)))  # warm-up
        out["saturation_rps"] = asyncio.run(closed_loop(url, bodies, args.clients, args.seconds))
    finally:
        stop(proc)
    print(f"final-exit server saturates at {out['saturation_rps']:.1f} requests/s", flush=True)
    rate = args.overload * out["saturation_rps"]
    out["modes"] = {}
    for mode in ("final", "anytime"):
        proc, url = start(args, mode)
        try:
            asyncio.run(closed_loop(url, bodies, 2, 2.0))  # warm-up
            out["modes"][mode] = asyncio.run(open_loop(url, bodies, rate, args.seconds, args.deadline_ms, args.seed))
        finally:
            stop(proc)
        print(mode, json.dumps(out["modes"][mode]), flush=True)
    table(
        f"over HTTP: {rate:.1f} requests/s ({args.overload:g}x the final-exit saturation of "
        f"{out['saturation_rps']:.1f}/s) for {args.seconds:g} s, deadline {args.deadline_ms:g} ms",
        out["modes"],
    )
    print(f"\n{args.run_dir}, {cpu}, {os.cpu_count()} cores, {args.threads} thread(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
