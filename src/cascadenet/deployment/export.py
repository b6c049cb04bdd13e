"""Exported programs of a trained cascade (``cascadenet export``): ONNX files for ONNX Runtime, ``torch.export``
programs (``.pt2``) and the same programs compiled ahead of time by AOTInductor (``aoti``, a ``.pt2`` package),
each with a dynamic batch dimension.

Two programs (``cascadenet.models.program``):

- the trajectory, ``x (B, C, H, W) -> logits (T, B, num_classes)``: inputs ``x``, output ``logits``;
- the step, ``(x, t, *state) -> (logits, *new_state)``: inputs ``x``, ``t`` (a 0-d int64), then the state
  (``stem`` when the stem is delayed, ``block0`` ...), outputs ``logits`` then ``new_stem``, ``new_block0`` ...;
  the state before step 0 is zeros of the shapes the file's inputs give (batch first). One program serves every
  step: feed each step's ``new_*`` outputs back as the next step's state.

ONNX export needs the optional packages ``onnx`` and ``onnxscript`` (``pip install cascadenet[export]``; ONNX Runtime,
``onnxruntime``, runs the files).

Which to use: a ``pt2`` program (``torch.export.load(path).module()``) is a portable graph that runs through the same
ATen kernels as eager PyTorch, with an FX module's Python on top, so it is no faster than eager (at batch 1 the step
program's slot gathers make it slower). ``aoti`` compiles that graph to native code once (tens of seconds; it needs
a C++ compiler, as ``torch.compile`` on the CPU does) and loads with ``load_compiled(path)``
(``torch._inductor.aoti_load_package``): the runtime for speed from PyTorch, next to ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.cascade import CascadedResNet
from ..models.program import StepProgram, TrajectoryProgram
from ..utils.files import atomic_write
from .loading import load_model

__all__ = ["FORMATS", "PROGRAMS", "describe", "export_program", "export_run", "load_compiled", "step_path"]

FORMATS = ("onnx", "pt2", "aoti")
SUFFIXES = {"onnx": "onnx", "pt2": "pt2"}  # a file name implies these; aoti (also a .pt2) is asked for by name
PROGRAMS = ("trajectory", "step")
MAX_BATCH = 1 << 16


def step_path(path: str | os.PathLike) -> Path:
    """Where the step program goes beside the trajectory's file: ``model.onnx`` -> ``model-step.onnx``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-step{path.suffix}")


def _program(model: CascadedResNet, which: str, input_size: tuple[int, int, int], scheme: str | None,
             num_steps: int | None) -> tuple[nn.Module, tuple[Any, ...], Any, list[str], list[str]]:  # fmt: skip
    """The module, example arguments, dynamic shapes, input and output names of one program."""
    dtype = next(model.parameters()).dtype
    x = torch.zeros((2, *input_size), dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if which == "trajectory":
        trajectory = TrajectoryProgram(model, input_size, num_steps=num_steps, scheme=scheme).eval()
        return trajectory, (x,), ({0: batch},), ["x"], ["logits"]
    program = StepProgram(model, input_size, scheme=scheme).eval()
    state = program.initial_state(x)
    names = program.state_names
    dynamic = ({0: batch}, None, tuple({0: batch} for _ in state))
    return program, (x, torch.tensor(0), *state), dynamic, ["x", "t", *names], ["logits", *(f"new_{n}" for n in names)]


def export_program(
    model: CascadedResNet,
    path: str | os.PathLike,
    *,
    program: str = "trajectory",
    format: str = "onnx",
    input_size: tuple[int, int, int],
    scheme: str | None = None,
    num_steps: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one program of ``model`` (see the module docstring) to ``path``, atomically.

    Args:
        program: ``trajectory`` or ``step``.
        format: ``onnx`` (ONNX opset of ``torch.onnx``'s dynamo exporter), ``pt2`` (``torch.export.save``) or
            ``aoti`` (the ``pt2`` program compiled by AOTInductor into a package; ``load_compiled`` runs it).
        input_size: ``(C, H, W)`` of the inputs.
        scheme, num_steps: the trajectory's scheme and length (the step program takes the scheme).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid choices: {', '.join(FORMATS)}")
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}; valid choices: {', '.join(PROGRAMS)}")
    if not isinstance(model, CascadedResNet):
        raise ValueError(f"export takes a cascaded ResNet, got a {type(model).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it (nothing was written)")
    model = model.eval()
    module, args, dynamic, inputs, outputs = _program(model, program, input_size, scheme, num_steps)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and progress notices are not the user's news
        if format == "pt2":
            exported = torch.export.export(module, args, dynamic_shapes=dynamic)
            buffer = io.BytesIO()
            torch.export.save(exported, buffer)
            data = buffer.getvalue()
        elif format == "aoti":
            data = _aoti_bytes(torch.export.export(module, args, dynamic_shapes=dynamic))
        else:
            data = _onnx_bytes(module, args, dynamic, inputs, outputs)
    atomic_write(path, data, overwrite=overwrite)
    return path


def _onnx_bytes(module: nn.Module, args: tuple[Any, ...], dynamic: Any, inputs: list[str], outputs: list[str]) -> bytes:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ValueError(
            "ONNX export needs the packages onnx and onnxscript: pip install 'cascadenet[export]'"
        ) from None
    quiet = logging.getLogger("torch.onnx")  # it logs the optional packages it skips, and its progress
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            return _onnx_file(module, args, dynamic, inputs, outputs, Path(tmp) / "program.onnx")
    finally:
        quiet.setLevel(level)


def _onnx_file(module: nn.Module, args: tuple[Any, ...], dynamic: Any, inputs: list[str], outputs: list[str],
               target: Path) -> bytes:  # fmt: skip
    exported = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, input_names=inputs,
                                 output_names=outputs, verbose=False, optimize=True)  # fmt: skip
    exported.save(str(target), external_data=False)
    return target.read_bytes()


def _aoti_bytes(exported: torch.export.ExportedProgram) -> bytes:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None and shutil.which("clang++") is None:
        raise ValueError(f"--format aoti compiles C++ and found no compiler ({compiler}, clang++): install one "
                         "(e.g. apt-get install g++) or export --format pt2 / onnx")  # fmt: skip
    from torch._inductor import aoti_compile_and_package

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        target = Path(tmp) / "program.pt2"
        try:
            aoti_compile_and_package(exported, package_path=str(target))
        except Exception as error:  # the compiler's or Inductor's failure, reported as one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"AOTInductor could not compile the program ({type(error).__name__}: {first[:300]})"
            ) from None
        return target.read_bytes()


def load_compiled(path: str | os.PathLike) -> Any:
    """A program written with ``format="aoti"``, ready to call like the module it was exported from."""
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))


def export_run(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    format: str | None = None,
    programs: tuple[str, ...] = PROGRAMS,
    scheme: str | None = None,
    num_steps: int | None = None,
    input_size: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Export a trained run (or weights file): the trajectory to ``output`` and the step program beside it
    (``step_path(output)``), or only those in ``programs``; the format from ``format`` or the file's suffix.

    The input size is the one the model was trained at (its metadata), or ``input_size`` ``(H, W)``.
    Returns the files written. Every target is checked before anything is written.
    """
    output = Path(output)
    fmt = format or SUFFIXES.get(output.suffix.lstrip(".").lower())
    if fmt not in FORMATS:
        raise ValueError(f"{output}: give --format onnx, pt2 or aoti (or a .onnx / .pt2 file name)")
    bad = [p for p in programs if p not in PROGRAMS]
    if bad or not programs:
        raise ValueError(f"unknown program {', '.join(bad) or '(none)'}; valid choices: {', '.join(PROGRAMS)}")
    targets = {p: output if p == "trajectory" or programs == ("step",) else step_path(output) for p in programs}
    for target in targets.values():
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it (nothing was written)")
        if not target.parent.is_dir():
            raise ValueError(f"{target}: the folder {target.parent} does not exist")
    model = load_model(source)
    if not isinstance(model, CascadedResNet):
        raise ValueError(f"{source}: export takes a cascaded ResNet, this is a {type(model).__name__}")
    size = input_size or model.preprocess.size
    if size is None:
        raise ValueError(f"{source}: the training input size is not recorded: give --input-size H W")
    shape = (model.in_channels, int(size[0]), int(size[1]))
    written = []
    for program, target in targets.items():
        written.append(export_program(model, target, program=program, format=fmt, input_size=shape, scheme=scheme,
                                      num_steps=num_steps, overwrite=overwrite))  # fmt: skip
    return written


def describe(paths: list[Path]) -> str:
    """What was written, one line per file."""
    return "\n".join(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)" for p in paths)
