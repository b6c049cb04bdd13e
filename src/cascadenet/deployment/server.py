"""An anytime HTTP server (``cascadenet serve``): image requests answered with class, probability, exit and time
spent, each request by its own deadline, concurrent requests batched.

``POST /predict?deadline_ms=50`` with the encoded image as the body (any format Pillow reads) answers
``{"class", "label", "probability", "exit", "macs", "ms", "deadline_ms", "deadline_met"}``; ``GET /health``
answers ``{"status": "ok", ...}`` with the scheduler's counts. A body that is not an image, or a bad
``deadline_ms``, gets a 400 with a one-line ``detail``; a request that cannot get even the first answer by its
deadline gets a 503 at once (see below).

The :class:`Scheduler` runs the model in one worker thread. Each round takes every request waiting (up to
``max_batch``) into one batch:

- ``anytime`` mode keeps deadlines by construction. :class:`StepTimes` holds each step's measured seconds at
  every batch size (measured when the scheduler starts, kept up to date by each round's own times). A request
  whose deadline is too near for the batch's first informative exit (the first answer there is) is answered at
  once as a miss (:class:`DeadlineError`, HTTP 503) instead of holding the others back; a request alone is
  still given that exit. The others run as many steps as are expected to finish, with a safety factor, before
  the earliest of their deadlines (less a margin for the answers and HTTP), and within ``round_share`` of the
  shortest deadline in the batch, so that the requests that arrive during a round still have at least the rest
  of their time when theirs starts; each answer is the exit the batch reached. The clock is read after every
  step: a round running slower than planned (a busier machine) stops at the step it has reached when the next
  one would end past its time, and the round's measured time corrects the estimates of the next rounds.
- ``final`` mode (the feed-forward baseline): every request runs to the last step, whatever its deadline.

The clock is injectable (``clock=``), so the deadline logic is tested exactly.

Needs the optional packages ``fastapi`` and ``uvicorn`` (``pip install 'cascadenet[serve]'``).
"""

# no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, whose types are imported
# inside make_app (the server's packages are optional), so they must be objects, not strings

import asyncio
import bisect
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..data.datasets import DataError
from ..evaluation.early_exit import predict
from ..evaluation.policies import Policy

__all__ = ["MODES", "DeadlineError", "Scheduler", "StepTimes", "make_app", "serve"]

MODES = ("anytime", "final")
INLINE_BODY = 16 << 10  # request bodies up to this many bytes are decoded on the event loop
SWITCH_INTERVAL = 0.0005  # seconds: how soon the event loop gets the interpreter lock from the scheduler's thread
log = logging.getLogger(__name__)


class DeadlineError(RuntimeError):
    """A request whose deadline is too near for even the first informative exit (answered at once, a miss)."""


class StepTimes:
    """Seconds each step of a model takes at each batch size.

    ``times[s][i]`` is step ``s``'s seconds at batch size ``sizes[i]`` (increasing); other sizes are interpolated
    linearly between the two neighbours, and beyond the largest extrapolated along the last two (below the
    smallest: the smallest's time). ``ratio`` scales every estimate: it follows the measured rounds (how much
    slower or faster they ran than estimated, e.g. as the machine's load changes), rising fast and falling
    slowly.
    """

    def __init__(self, sizes: Sequence[int], times: Sequence[Sequence[float]]) -> None:
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"sizes must be increasing positive batch sizes, got {list(sizes)}")
        if any(len(row) != len(sizes) for row in times):
            raise ValueError("times needs one row per step with one time per batch size")
        self.sizes = [int(b) for b in sizes]
        self.times = [[float(t) for t in row] for row in times]
        self.ratio = 1.0

    @property
    def num_steps(self) -> int:
        return len(self.times)

    def step(self, s: int, batch: int) -> float:
        """Estimated seconds of step ``s`` at batch size ``batch`` (without ``ratio``)."""
        sizes, row = self.sizes, self.times[s]
        if len(sizes) == 1 or batch <= sizes[0]:
            return row[0]
        i = min(bisect.bisect_left(sizes, batch), len(sizes) - 1)
        lo, hi = sizes[i - 1], sizes[i]
        return max(row[i - 1] + (row[i] - row[i - 1]) * (batch - lo) / (hi - lo), 0.0)

    def cumulative(self, batch: int) -> list[float]:
        """Estimated seconds from the start of a run at ``batch`` to the end of each step (with ``ratio``)."""
        return [self.ratio * t for t in itertools.accumulate(self.step(s, batch) for s in range(self.num_steps))]

    def observe(self, estimated: float, measured: float) -> None:
        """A round estimated (without ``ratio``) at ``estimated`` seconds took ``measured``: update ``ratio``."""
        if estimated <= 0:
            return
        seen = min(max(measured / estimated, 0.25), 10.0)
        self.ratio += (0.5 if seen > self.ratio else 0.1) * (seen - self.ratio)

    @classmethod
    def measure(
        cls,
        model: nn.Module,
        x: Tensor,
        max_batch: int,
        *,
        repeats: int = 3,
        longest: float = 1.0,
    ) -> "StepTimes":
        """Time every step of ``model`` on copies of one input ``x`` ``(C, H, W)`` at batch sizes 1, 2, 4, ...
        up to ``max_batch``, stopping early once a run takes ``longest`` seconds (larger batches extrapolate);
        each size's fastest of ``repeats`` runs, then the stalls removed (see ``_plausible``)."""
        sizes: list[int] = []
        columns: list[list[float]] = []
        predict(model, x[None], deadline=math.inf)  # warm-up
        b = 1
        while True:
            runs = [_step_seconds(model, x.expand(b, *x.shape).contiguous()) for _ in range(repeats)]
            sizes.append(b)
            columns.append([min(r[s] for r in runs) for s in range(len(runs[0]))])
            if b >= max_batch or sum(columns[-1]) >= longest:
                break
            b = min(2 * b, max_batch)
        return cls(sizes, [_plausible(sizes, list(row)) for row in zip(*columns)])


def _plausible(sizes: list[int], times: list[float]) -> list[float]:
    """One step's measured times at increasing batch sizes with the stalls removed (a run whose thread waited for
    the CPU or the interpreter lock): a batch takes at most proportionally longer than a smaller one, and no
    less time than a smaller one."""
    times = list(times)
    for i in range(1, len(times)):
        times[i] = min(times[i], times[i - 1] * sizes[i] / sizes[i - 1])
    for i in range(len(times) - 2, -1, -1):
        times[i] = min(times[i], times[i + 1])
    return times


def _step_seconds(model: nn.Module, x: Tensor, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each step of one run of ``model`` on ``x`` to the last step (the clock read once per step)."""
    readings: list[float] = []
    sync = torch.cuda.synchronize if x.device.type == "cuda" else None

    def reading() -> float:
        if sync is not None:
            sync()
        readings.append(clock())
        return readings[-1]

    with torch.no_grad():
        predict(model, x, deadline=math.inf, clock=reading)
    return [b - a for a, b in itertools.pairwise(readings)]


@dataclass
class _Request:
    x: Tensor  # (C, H, W), preprocessed
    arrival: float  # clock seconds
    deadline: float  # absolute clock seconds
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Scheduler:
    """Batches concurrent requests and answers each by its deadline (see the module docstring).

    Args:
        model: a loaded model (``cascadenet.load_model``), in evaluation mode.
        mode: ``anytime`` (keep deadlines with earlier exits) or ``final`` (every request to the last step).
        policy: an optional stopping policy (stop earlier when confident).
        max_batch: the most requests in one round (under overload a round takes every request waiting up to this;
            a small limit leaves requests waiting for later rounds).
        margin: seconds kept back from each round's deadline for what follows the model (answers, HTTP).
        safety: the factor on every estimated step time.
        round_share: the longest a round may run, as a share of the shortest deadline in it.
        step_times: the model's step times (default: measured at the start, ``anytime`` mode only, on copies of
            ``example``, or of a zero image of the model's input size).
        example: one preprocessed input ``(C, H, W)`` to measure the step times on.
        clock: seconds (default ``time.perf_counter``): arrivals, deadlines, rounds and answers' times.
        start: start the worker thread (tests run rounds by hand with :meth:`run_round`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str = "anytime",
        policy: Policy | None = None,
        max_batch: int = 512,
        margin: float = 0.010,
        safety: float = 1.2,
        round_share: float = 0.5,
        step_times: StepTimes | None = None,
        example: Tensor | None = None,
        clock: Callable[[], float] | None = None,
        start: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"--max-batch must be a positive integer, got {max_batch!r}")
        if not 0 < round_share <= 1:
            raise ValueError(f"--round-share must be in (0, 1], got {round_share!r}")
        self.model = model.eval()
        self.mode = mode
        self.policy = policy
        self.max_batch = max_batch
        self.margin = margin
        self.safety = safety
        self.round_share = round_share
        self.clock = clock or time.perf_counter
        self.classes = getattr(model, "classes", None)
        self.device = next(model.parameters()).device
        self.first = int(model.first_informative_exit)
        self.counts = {"rounds": 0, "answered": 0, "missed": 0, "shed": 0}
        if step_times is None and mode == "anytime":
            if example is None:
                example = self._zero_image()
            with torch.no_grad():
                step_times = StepTimes.measure(model, example.to(self.device), max_batch)
        self.step_times = step_times
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="cascadenet-scheduler", daemon=True)
        if start:
            self._thread.start()

    def _zero_image(self) -> Tensor:
        preprocess = getattr(self.model, "preprocess", None)
        size, channels = getattr(preprocess, "size", None), getattr(preprocess, "channels", None)
        if size is None or channels is None:
            raise ValueError("the model's input size is not known: give the scheduler an example input")
        return torch.zeros(int(channels), int(size[0]), int(size[1]))

    def submit(self, x: Tensor, deadline_s: float, arrival: float | None = None) -> concurrent.futures.Future:
        """Queue one preprocessed image ``(C, H, W)`` due ``deadline_s`` seconds after ``arrival`` (a reading of
        the scheduler's clock; default now); the future's result is the answer dict (or :class:`DeadlineError`)."""
        now = self.clock() if arrival is None else arrival
        request = _Request(x, now, now + deadline_s)
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _take(self, block: bool) -> list[_Request] | None:
        """Every request waiting, up to ``max_batch`` (None: closed)."""
        try:
            first = self._queue.get(block=block)
        except queue.Empty:
            return []
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this round
                break
            batch.append(item)
        return batch

    def _work(self) -> None:
        while (batch := self._take(block=True)) is not None:
            self._serve(batch)

    def run_round(self) -> int:
        """Run one round on the requests waiting now, in the calling thread (for schedulers made with
        ``start=False``); the number of requests taken."""
        batch = self._take(block=False) or []
        if batch:
            self._serve(batch)
        return len(batch)

    def _serve(self, batch: list[_Request]) -> None:
        try:
            self._round(batch)
        except Exception as e:  # a failure answers this round's requests; the server goes on
            log.exception("prediction failed")
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)

    def plan(self, batch: list[_Request], now: float) -> tuple[list[_Request], list[_Request], int, float]:
        """Split a round's requests into those to run and those to answer at once as misses, choose the last step
        to run and the time by which the run must end: ``(run, shed, last_step, end)`` (see the module
        docstring)."""
        last = self.step_times.num_steps - 1 if self.step_times is not None else None
        if self.mode == "final" or last is None:
            return batch, [], last if last is not None else -1, math.inf
        first = min(self.first, last)
        need = self.safety * self.step_times.cumulative(len(batch))[first]
        run = [r for r in batch if r.deadline - now - self.margin >= need]
        shed = [r for r in batch if r.deadline - now - self.margin < need]
        if not run and len(shed) == 1:  # alone: its first informative exit holds no one back
            return shed, [], first, now
        if not run:
            return [], shed, first, now
        ends = self.step_times.cumulative(len(run))
        limit = min(min(r.deadline for r in run) - now - self.margin,
                    self.round_share * min(r.deadline - r.arrival for r in run))  # fmt: skip
        step = max([s for s in range(first, last + 1) if self.safety * ends[s] <= limit], default=first)
        return run, shed, step, now + limit

    def _round(self, batch: list[_Request]) -> None:
        now = self.clock()
        run, shed, step, end = self.plan(batch, now)
        self.counts["rounds"] += 1
        for r in shed:
            self.counts["shed"] += 1
            self.counts["missed"] += 1
            waited = 1e3 * (now - r.arrival)
            r.future.set_exception(DeadlineError(
                f"deadline {1e3 * (r.deadline - r.arrival):g} ms cannot be met: {waited:.1f} ms spent waiting, "
                f"and the first answer takes longer than the rest under this load"))  # fmt: skip
        if not run:
            return
        x = torch.stack([r.x for r in run]).to(self.device)
        with torch.no_grad():
            if self.mode == "anytime" and self.policy is None:
                labels, steps, macs, confidence = self._run_until(x, step, end)
            else:
                budget = None
                if self.mode == "anytime" and step < self.step_times.num_steps - 1:
                    budget = self._costs(x)[step]
                result = predict(self.model, x, self.policy, budget=budget)
                labels, steps = result.predictions.tolist(), result.steps.tolist()
                macs, confidence = result.macs.tolist(), result.confidence.tolist()
        done = self.clock()
        if self.mode == "anytime":
            estimated = sum(self.step_times.step(s, len(run)) for s in range(max(steps) + 1))  # without ratio
            self.step_times.observe(estimated, done - now)
        for i, r in enumerate(run):
            k = int(labels[i])
            met = done <= r.deadline
            self.counts["answered"] += 1
            self.counts["missed"] += not met
            r.future.set_result({
                "class": self.classes[k] if self.classes and k < len(self.classes) else str(k),
                "label": k,
                "probability": confidence[i],
                "exit": int(steps[i]),
                "macs": int(macs[i]),
                "ms": 1e3 * (done - r.arrival),
                "deadline_ms": 1e3 * (r.deadline - r.arrival),
                "deadline_met": met,
                "batch": len(run),
            })  # fmt: skip

    def _run_until(self, x: Tensor, last: int, end: float) -> tuple[list[int], list[int], list[int], list[float]]:
        """Run the batch step by step to step ``last`` at most, and stop earlier, at the step reached, when the next
        step is not expected to end by ``end`` (the plan's estimate was too low: the machine slowed down); every
        example's label, exit, MACs and probability."""
        n = x.shape[0]
        probs = None
        for s in self.model.anytime(x):
            if s.step < self.first:
                continue
            next_step = (
                self.step_times.ratio * self.safety * self.step_times.step(s.step + 1, n) if s.step < last else 0
            )
            if s.step >= last or self.clock() + next_step > end:
                probs = torch.softmax(s.logits.float(), dim=-1)
                break
        assert probs is not None
        confidence, labels = probs.max(dim=-1)
        cost = self._costs(x)[s.step]
        return labels.tolist(), [s.step] * n, [cost] * n, confidence.tolist()

    def _costs(self, x: Tensor) -> list[int]:
        """The cumulative MACs per example to each exit."""
        if not hasattr(self, "_cumulative"):
            self._cumulative = list(self.model.exit_costs(tuple(x.shape[1:])).macs)
        return self._cumulative


def make_app(scheduler: Scheduler, *, default_deadline_ms: float = 100.0) -> Any:
    """The FastAPI application over a scheduler (``POST /predict``, ``GET /health``)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = FastAPI(title="cascadenet", description="Anytime prediction with per-request deadlines")
    model = scheduler.model

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        ratio = scheduler.step_times.ratio if scheduler.step_times is not None else None
        return {"status": "ok", "mode": scheduler.mode, "classes": scheduler.classes, **scheduler.counts,
                "step_time_ratio": ratio}  # fmt: skip

    @app.post("/predict")
    async def predict_image(request: Request, deadline_ms: float | None = None) -> JSONResponse:
        arrival = scheduler.clock()  # the deadline counts the body's reading and decoding too
        wait = default_deadline_ms if deadline_ms is None else deadline_ms
        if not wait > 0 or wait != wait or wait == float("inf"):
            raise HTTPException(400, f"deadline_ms must be a positive number, got {deadline_ms}")
        body = await request.body()
        if not body:
            raise HTTPException(400, "the request body must be an encoded image (PNG, JPEG, ...); it is empty")
        try:
            # a small image decodes faster than a hop to the thread pool and back takes (each hop waits for the
            # interpreter lock, which the scheduler's thread holds between the model's kernels)
            x = model.preprocess(body) if len(body) <= INLINE_BODY else await run_in_threadpool(model.preprocess, body)
        except (DataError, ValueError) as e:
            raise HTTPException(400, " ".join(str(e).split())) from None
        future = scheduler.submit(x[0], wait / 1000, arrival)
        try:
            return JSONResponse(await asyncio.wrap_future(future))  # (not FastAPI's slower generic encoding)
        except DeadlineError as e:
            raise HTTPException(503, str(e)) from None

    return app


def serve(
    source: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    mode: str = "anytime",
    policy: Policy | None = None,
    deadline_ms: float = 100.0,
    max_batch: int = 512,
    device: str = "auto",
    input_size: tuple[int, int] | None = None,
    margin_ms: float = 10.0,
    round_share: float = 0.5,
) -> None:
    """Load a trained run (or weights file) and serve it over HTTP until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError("cascadenet serve needs the packages fastapi and uvicorn: "
                         "pip install 'cascadenet[serve]'") from None  # fmt: skip
    from ..utils.device import resolve_device
    from .loading import load_model

    if not deadline_ms > 0:
        raise ValueError(f"--deadline-ms must be positive, got {deadline_ms}")
    if not 0 <= margin_ms < math.inf:
        raise ValueError(f"--margin-ms must be a number >= 0, got {margin_ms}")
    model = load_model(source, map_location=resolve_device(device))
    if model.preprocess.mean is None:
        raise ValueError(f"{source}: no normalisation statistics recorded with the weights: cannot serve images")
    if input_size is not None:
        model.preprocess = dataclasses.replace(model.preprocess, size=(int(input_size[0]), int(input_size[1])))
    elif model.preprocess.size is None:
        raise ValueError(f"{source}: the training input size is not recorded (a run from before it was): "
                         "give --input-size H W")  # fmt: skip
    # the scheduler's thread runs the model's Python between kernels; by default another thread waits up to 5 ms
    # for the interpreter lock, and a request's path through the event loop needs it several times
    sys.setswitchinterval(SWITCH_INTERVAL)
    scheduler = Scheduler(model, mode=mode, policy=policy, max_batch=max_batch, margin=margin_ms / 1000,
                          round_share=round_share)  # fmt: skip
    print(f"serving {source} on http://{host}:{port} ({mode}; POST /predict)", flush=True)
    try:
        uvicorn.run(make_app(scheduler, default_deadline_ms=deadline_ms), host=host, port=port, log_level="warning")
    finally:
        scheduler.close()
