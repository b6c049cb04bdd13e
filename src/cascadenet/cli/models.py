"""The verbs about models rather than runs: ``models`` (the registered names) and ``convert`` (a torchvision
ResNet into a cascade)."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

__all__ = ["ConvertCommand", "ModelsCommand"]


@dataclass
class ModelsCommand:
    """List the registered models (the names --model takes)."""

    pattern: tyro.conf.Positional[str | None] = None
    """Glob pattern, e.g. 'resnet1*'."""

    def run(self) -> None:
        from ..models.registry import list_models

        print("\n".join(list_models(self.pattern)))


@dataclass
class ConvertCommand:
    """Convert a torchvision-layout ResNet state dict (a local file; nothing is downloaded) into a cascaded
    ResNet of the same depth: same weights, batch-norm statistics copied to every step. Fine-tune it with
    `cascadenet train --init OUTPUT`."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RESNET.pth")]
    """A state dict of torchvision's ResNet (resnet18/34/50 layout): .pth, .pt or .safetensors."""
    output: Annotated[str, tyro.conf.arg(aliases=("-o",))]
    """The cascaded model to write (.safetensors)."""
    overwrite: bool = False
    """Allow --output to replace an existing file."""
    num_steps: int | None = None
    """Steps of a trajectory (default: the settling time, blocks + 2 with the stem delayed)."""
    scheme: Literal["parallel", "serial"] = "parallel"
    """Default execution scheme of the cascade."""
    stem_delay: bool = True
    """Delay the stem output by one step."""
    temporal_bn: bool = True
    """Batch-norm running statistics per step (each starts as the pretrained network's)."""
    temporal_affine: bool = False
    """Batch-norm scale and shift per step too."""
    multi_head: bool = False
    """One classifier per step (each starts as the pretrained classifier)."""

    def run(self) -> None:
        from ..models.pretrained import convert_file

        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        source, output, overwrite = options.pop("source"), options.pop("output"), options.pop("overwrite")
        model = convert_file(source, output, overwrite=overwrite, **options)
        c = model.config
        print(f"wrote {output}: cascaded {c.arch}, width {c.width}, {c.num_classes} classes, {model.num_steps} steps "
              f"(next: cascadenet train --init {shlex.quote(str(output))} ...)")  # fmt: skip
