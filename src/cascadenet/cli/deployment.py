"""The verbs that take a trained model out of the project: ``export`` (ONNX, torch.export programs) and ``serve``
(an anytime HTTP server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from .options import Device, RunDir, Threads

__all__ = ["ExportCommand", "ServeCommand"]


@dataclass
class ExportCommand:
    """Export a trained cascade as programs with a dynamic batch: the trajectory x -> logits (T, B, C) to OUTPUT,
    and the step program (x, t, *state) -> (logits, *new_state), one program for every step, beside it
    (model.onnx -> model-step.onnx). ONNX files run under ONNX Runtime; .pt2 files load with torch.export.load;
    --format aoti compiles the programs with AOTInductor (needs a C++ compiler; fastest from PyTorch; load with
    cascadenet.deployment.export.load_compiled)."""

    run_dir: RunDir
    """Run directory written by `cascadenet train` (or a model.safetensors file)."""
    output: Annotated[str, tyro.conf.arg(aliases=("-o",))]
    """The trajectory program's file (.onnx or .pt2); the step program goes beside it with -step."""
    format: Literal["onnx", "pt2", "aoti"] | None = None
    """onnx (ONNX Runtime), pt2 (torch.export) or aoti (pt2 compiled by AOTInductor); default: from the file name
    (.onnx, .pt2)."""
    program: Literal["both", "trajectory", "step"] = "both"
    """Which programs to write (one program alone goes to OUTPUT)."""
    scheme: Literal["parallel", "serial"] | None = None
    """Execution scheme (default: the model's)."""
    num_steps: int | None = None
    """Steps of the trajectory program (default: the model's)."""
    input_size: tuple[int, int] | None = None
    """H W of the inputs (default: the size the model was trained at, from its files)."""
    overwrite: bool = False
    """Allow replacing existing files."""
    threads: Threads = None

    def run(self) -> None:
        from ..deployment.export import PROGRAMS, describe, export_run

        programs = PROGRAMS if self.program == "both" else (self.program,)
        paths = export_run(self.run_dir, self.output, format=self.format, programs=programs, scheme=self.scheme,
                           num_steps=self.num_steps, input_size=self.input_size, overwrite=self.overwrite)  # fmt: skip
        print(describe(paths))


@dataclass
class ServeCommand:
    """Serve a trained model over HTTP: POST /predict?deadline_ms=50 with an encoded image as the body answers
    class, probability, exit, MACs and milliseconds spent; concurrent requests are batched, and in anytime mode
    each round runs the steps that fit before its earliest deadline (earlier exits under overload, not a growing
    queue); a request too late for even the first exit gets a 503 at once.
    Needs fastapi and uvicorn (pip install 'cascadenet[serve]')."""

    run_dir: RunDir
    """Run directory written by `cascadenet train` (or a model.safetensors file)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """Port to listen on."""
    mode: Literal["anytime", "final"] = "anytime"
    """anytime: keep each request's deadline with earlier exits; final: every request to the last step."""
    deadline_ms: float = 100.0
    """The deadline of a request that gives none (its deadline_ms query parameter)."""
    threshold: float | None = None
    """Also stop a request at the first step whose max softmax probability is >= this."""
    max_batch: int = 512
    """The most requests answered in one batch."""
    margin_ms: float = 10.0
    """anytime: milliseconds of each deadline kept back for what follows the model (answers, HTTP, the client)."""
    round_share: float = 0.5
    """anytime: the longest a round may run, as a share of the shortest deadline in it (the rest is for the
    requests that arrive meanwhile)."""
    input_size: tuple[int, int] | None = None
    """H W the images are resized to (default: the size the model was trained at, from its files)."""
    device: Device = "auto"
    threads: Threads = None

    def run(self) -> None:
        from ..deployment.server import serve
        from ..evaluation.early_exit import policy_from_flags

        serve(self.run_dir, host=self.host, port=self.port, mode=self.mode, policy=policy_from_flags(self.threshold),
              deadline_ms=self.deadline_ms, max_batch=self.max_batch, device=self.device,
              input_size=self.input_size, margin_ms=self.margin_ms,
              round_share=self.round_share)  # fmt: skip
