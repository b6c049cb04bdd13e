"""The verbs that train and compare several runs in one command: ``demo`` and ``reproduce``. Their --out folder is
a workspace: finished runs are reused, interrupted ones resumed, and the report is rewritten from the runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..data.datasets import DatasetName
from .options import DataRoot, Device, Progress, Threads, progress_of

__all__ = ["DemoCommand", "ReproduceCommand"]


@dataclass
class DemoCommand:
    """The main job: train CascadedTD and CascadedCE on Fashion-MNIST, evaluate both, write a report."""

    out: str = "runs/demo"
    """Folder of the two runs and report.md (finished runs are reused, unfinished ones resumed; the report and the
    figure are rewritten)."""
    epochs: int | None = None
    """Override the epochs of both runs (a quicker, weaker demo)."""
    data_root: DataRoot = None
    device: Device = "auto"
    threads: Threads = 2
    progress: Progress = None

    def run(self) -> None:
        from ..experiments.demo import run_demo

        report = run_demo(self.out, data_root=self.data_root, threads=self.threads, device=self.device,
                          epochs=self.epochs, progress=self.progress)  # fmt: skip
        print(f"report: {report}")


@dataclass
class ReproduceCommand:
    """The paper's comparison in one command: CascadedTD(-MultiHead), SerialTD(-MultiHead), CascadedCE, SerialCE,
    SDN, SDN-IC-only, SDN-stem-IC and MSDNet, same data, seeds and recipe, the same number of configurations for
    every model chosen on validation; areas on one cost axis shared by every model, latency in block units and in
    layers, paired statistics; writes <out>/<dataset>-<budget>/<dataset>.md (tables and plots) and <dataset>.json.
    Finished runs are reused (if their options match), interrupted ones resumed, and the report is rewritten."""

    dataset: DatasetName = "fashion-mnist"
    """Dataset (read from --data-root in its standard layout)."""
    seeds: int = 3
    """Seeds per model (0..N-1)."""
    budget: Literal["small", "full"] = "small"
    """small: ResNet-10 width 8, 3 short epochs (2 CPU cores); full: the paper's recipe (ResNet-18, 150 epochs)."""
    out: str = "runs/reproduce"
    """Parent folder of the runs and the report."""
    models: tuple[str, ...] | None = None
    """Reproduce only these rows (cascaded-td, cascaded-td-mh, serial-td, serial-td-mh, cascaded-ce, serial-ce,
    sdn, sdn-ic-only, sdn-stem, msdnet; CascadedTD is always included); default: all."""
    data_root: DataRoot = None
    device: Device = "auto"
    threads: Threads = 2
    progress: Progress = None

    def run(self) -> None:
        from ..experiments.reproduce import reproduce

        report = reproduce(self.dataset, data_root=self.data_root, seeds=self.seeds, budget=self.budget,
                           out=self.out, threads=self.threads, device=self.device,
                           progress=progress_of(self.progress), models=self.models)  # fmt: skip
        print(f"report: {report}")
