"""An anytime HTTP server (``cascadenet serve``): image requests answered with class, probability, exit and time
spent, each request by its own deadline, concurrent requests batched.

``POST /predict?deadline_ms=50`` with the encoded image as the body (any format Pillow reads) answers
``{"class", "label", "probability", "exit", "macs", "ms", "deadline_ms", "deadline_met"}``; ``GET /health``
answers ``{"status": "ok", ...}``. A body that is not an image, or a bad ``deadline_ms``, gets a 400 with a
one-line ``detail``.

The :class:`Scheduler` runs the model in one worker thread. Each round takes every request waiting (up to
``max_batch``), stacks them into one batch and runs ``cascadenet.predict`` on it:

- ``anytime`` mode: with the deadline of the batch's most urgent request (less the time it has already waited),
  and at most half of the shortest deadline in the batch, so under overload the batch stops at an earlier exit
  instead of the queue growing: the requests that arrived during a round are the next round and still have at
  least half of their time;
- ``final`` mode (the feed-forward baseline): every request runs to the last step, whatever its deadline.

Needs the optional packages ``fastapi`` and ``uvicorn`` (``pip install 'cascadenet[serve]'``).
"""

# no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, whose types are imported
# inside make_app (the server's packages are optional), so they must be objects, not strings

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..data.datasets import DataError
from ..evaluation.early_exit import predict
from ..evaluation.policies import Policy

__all__ = ["MODES", "Scheduler", "make_app", "serve"]

MODES = ("anytime", "final")
log = logging.getLogger(__name__)


@dataclass
class _Request:
    x: Tensor  # (C, H, W), preprocessed
    arrival: float  # perf_counter seconds
    deadline: float  # absolute perf_counter seconds
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
        round_share: the longest a round may run, as a share of the shortest deadline in it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str = "anytime",
        policy: Policy | None = None,
        max_batch: int = 512,
        margin: float = 0.002,
        round_share: float = 0.5,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"--max-batch must be a positive integer, got {max_batch!r}")
        self.model = model.eval()
        self.mode = mode
        self.policy = policy
        self.max_batch = max_batch
        self.margin = margin
        self.round_share = round_share
        self.classes = getattr(model, "classes", None)
        self.device = next(model.parameters()).device
        self.size = tuple(getattr(getattr(model, "preprocess", None), "size", None) or ())
        self.costs = None
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="cascadenet-scheduler", daemon=True)
        self._thread.start()

    def submit(self, x: Tensor, deadline_s: float, arrival: float | None = None) -> concurrent.futures.Future:
        """Queue one preprocessed image ``(C, H, W)`` due ``deadline_s`` seconds after ``arrival`` (a
        ``time.perf_counter()`` reading; default now); the future's result is the answer dict."""
        now = time.perf_counter() if arrival is None else arrival
        request = _Request(x, now, now + deadline_s)
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
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
            try:
                self._round(batch)
            except Exception as e:  # a failure answers this round's requests; the server goes on
                log.exception("prediction failed")
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)

    def _round(self, batch: list[_Request]) -> None:
        x = torch.stack([r.x for r in batch]).to(self.device)
        deadline = None
        if self.mode == "anytime":
            # at most half of the shortest deadline: a request arriving while this round runs still has half of
            # its own when its round starts (a round as long as the most urgent request allows would leave it none)
            left = min(min(r.deadline for r in batch) - time.perf_counter(),
                       self.round_share * min(r.deadline - r.arrival for r in batch)) - self.margin  # fmt: skip
            deadline = max(left, 1e-6)  # past due: the first informative exit, at once
        with torch.no_grad():
            result = predict(self.model, x, self.policy, deadline=deadline)
        done = time.perf_counter()
        confidence = result.confidence.tolist()
        for i, r in enumerate(batch):
            k = int(result.predictions[i])
            r.future.set_result({
                "class": self.classes[k] if self.classes and k < len(self.classes) else str(k),
                "label": k,
                "probability": confidence[i],
                "exit": int(result.steps[i]),
                "macs": int(result.macs[i]),
                "ms": 1e3 * (done - r.arrival),
                "deadline_ms": 1e3 * (r.deadline - r.arrival),
                "deadline_met": done <= r.deadline,
                "batch": len(batch),
            })  # fmt: skip


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
        return {"status": "ok", "mode": scheduler.mode, "classes": scheduler.classes}

    @app.post("/predict")
    async def predict_image(request: Request, deadline_ms: float | None = None) -> dict[str, Any]:
        arrival = time.perf_counter()  # the deadline counts the body's reading and decoding too
        wait = default_deadline_ms if deadline_ms is None else deadline_ms
        if not wait > 0 or wait != wait or wait == float("inf"):
            raise HTTPException(400, f"deadline_ms must be a positive number, got {deadline_ms}")
        body = await request.body()
        if not body:
            raise HTTPException(400, "the request body must be an encoded image (PNG, JPEG, ...); it is empty")
        try:
            x = await run_in_threadpool(model.preprocess, body)
        except (DataError, ValueError) as e:
            raise HTTPException(400, " ".join(str(e).split())) from None
        future = scheduler.submit(x[0], wait / 1000, arrival)
        return await asyncio.wrap_future(future)

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
    model = load_model(source, map_location=resolve_device(device))
    if model.preprocess.mean is None:
        raise ValueError(f"{source}: no normalisation statistics recorded with the weights: cannot serve images")
    if input_size is not None:
        model.preprocess = dataclasses.replace(model.preprocess, size=(int(input_size[0]), int(input_size[1])))
    elif model.preprocess.size is None:
        raise ValueError(f"{source}: the training input size is not recorded (a run from before it was): "
                         "give --input-size H W")  # fmt: skip
    scheduler = Scheduler(model, mode=mode, policy=policy, max_batch=max_batch)
    print(f"serving {source} on http://{host}:{port} ({mode}; POST /predict)", flush=True)
    try:
        uvicorn.run(make_app(scheduler, default_deadline_ms=deadline_ms), host=host, port=port, log_level="warning")
    finally:
        scheduler.close()
