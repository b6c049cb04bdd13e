"""Training on several processes (GPUs, nodes) under ``torchrun``: PyTorch's own machinery, nothing home-made.

``cascadenet train`` started by ``torchrun --nproc_per_node N`` (or a multi-node ``torchrun``) finds the
environment torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...) and joins the process
group: NCCL for CUDA tensors, gloo for CPU ones. What changes with N processes:

- ``--batch-size`` is per process; an optimizer step sees ``N * batch_size`` examples. Every process draws the
  epoch's order and augmentation from the same seeded generator and takes its own slice of each global batch, so
  the processes see disjoint parts of every epoch whose union is the epoch, and N processes at batch B/N compute
  what one process at batch B computes.
- Gradients are averaged by ``DistributedDataParallel``. Batch normalisation is synchronised: every temporal
  batch-norm slot normalises with the statistics of the global batch (all-reduced in the forward pass, and
  through the backward pass), so the running statistics of every slot are identical on every process.
- Rank 0 alone holds the run directory's lock and writes in it (config, checkpoints, metrics, weights) and shows
  progress; the others read nothing from it (rank 0 sends them the configuration and the checkpoint), so nodes
  need the data but not a shared run directory.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models.norm import TemporalBatchNorm2d

__all__ = ["World", "launched", "setup", "teardown", "SyncTemporalBatchNorm2d", "convert_sync_temporal_bn"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    local_rank: int
    owned: bool  # this module started the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(timeout_minutes: float = 60.0) -> World | None:
    """Join the process group torchrun describes (or use one already initialised); None for a single process.

    The timeout bounds how long a process waits for the others in a collective (rank 0 alone writes checkpoints
    while the others wait for the next step).
    """
    if not launched():
        return None
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: cannot train on several processes")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owned = not dist.is_initialized()
    if owned:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, owned=owned)


def teardown(world: World | None) -> None:
    if world is not None and world.owned and dist.is_initialized():
        dist.destroy_process_group()


def device_for(name: str, world: World) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when CUDA is available, else CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", world.local_rank % torch.cuda.device_count())
        if name == "cuda":
            raise ValueError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cpu")
    raise ValueError(
        f"--device {name}: under torchrun each process uses the GPU of its LOCAL_RANK; pass --device cuda, auto or cpu"
    )


# ----------------------------------------------------------------------------------------------------------------
# Objects and tensors between processes


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (pickled through CPU memory)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every process."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over the processes (no gradient)."""
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def wrap(objective: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """``DistributedDataParallel`` around the training objective. Buffers are not re-broadcast at every forward:
    synchronised batch norm keeps them identical on every process."""
    options: dict[str, Any] = {"find_unused_parameters": find_unused_parameters}
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    options["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    if device.type == "cuda":
        options["device_ids"] = [device]
    return nn.parallel.DistributedDataParallel(objective, **options)


# ----------------------------------------------------------------------------------------------------------------
# Synchronised temporal batch norm


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, with the gradient summed over processes too (each process's loss depends on every
    process's batch through the global statistics)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def _synchronised() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncTemporalBatchNorm2d(TemporalBatchNorm2d):
    """Temporal batch norm whose batch statistics (in training) are those of the global batch over all processes.

    Each group (a step's state) is normalised with the mean and variance of that group over every process's
    batch: per process the mean and variance are computed locally (two-pass, exact), then the sums of
    ``n * mean`` and ``n * (var + mean**2)`` are all-reduced in float64 and combined. The all-reduce carries
    gradients, so the backward pass is that of one process holding the whole global batch. The statistics
    returned for the running averages are the global ones: every process folds the same numbers into every slot.
    Every process must run the same per-process batch size (the trainer's sharding guarantees it).

    Outside a multi-process run, or in evaluation, it is exactly :class:`TemporalBatchNorm2d`.
    """

    def forward_groups(
        self, x: Tensor, stat_slots: list[int], affine_slots: list[int], count: int | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        if not (self.training and _synchronised()):
            return super().forward_groups(x, stat_slots, affine_slots, count)
        world = dist.get_world_size()
        if count is not None:  # input-independent states are the same on every process: only the count is global
            return super().forward_groups(x, stat_slots, affine_slots, count * world)
        b, g, c, h, w = x.shape
        weight = self._gather(self.weight, affine_slots).view(1, g, c, 1, 1)
        bias = self._gather(self.bias, affine_slots).view(1, g, c, 1, 1)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        n = b * h * w
        local_mean = xf.mean(dim=(0, 3, 4))  # (G, C)
        local_var = xf.var(dim=(0, 3, 4), unbiased=False)
        acc = torch.float32 if x.device.type == "mps" else torch.float64
        sums = torch.stack([local_mean.to(acc) * n, (local_var.to(acc) + local_mean.to(acc) ** 2) * n])
        total = _AllReduceSum.apply(sums)
        big_n = n * world
        mean = total[0] / big_n
        var = (total[1] / big_n - mean**2).clamp_min(0)
        inv = torch.rsqrt(var + self.eps).to(xf.dtype)
        y = (xf - mean.to(xf.dtype)[None, :, :, None, None]) * inv[None, :, :, None, None] * weight + bias
        unbiased = var.detach() * (big_n / max(big_n - 1, 1))
        dtype = self.running_mean.dtype
        return y.to(x.dtype), (mean.detach().to(dtype), unbiased.to(dtype))


_SYNCED: dict[type, type] = {TemporalBatchNorm2d: SyncTemporalBatchNorm2d}


def _synced_class(cls: type) -> type:
    """The synchronised form of a temporal batch norm class: for a subclass (a cascaded user network's
    ``StepBatchNorm2d``, which reads its step from the module branch around it) the subclass with the
    synchronised ``forward_groups`` under it, made once per class."""
    if cls not in _SYNCED:
        if "forward_groups" in vars(cls):
            raise TypeError(f"{cls.__name__} has its own forward_groups: cannot synchronise its batch statistics")
        _SYNCED[cls] = type(f"Sync{cls.__name__}", (cls, SyncTemporalBatchNorm2d), {"__module__": __name__})
    return _SYNCED[cls]


def convert_sync_temporal_bn(model: nn.Module) -> nn.Module:
    """Make every :class:`TemporalBatchNorm2d` of ``model`` synchronised, in place (same parameters, buffers and
    state-dict keys; only the class changes): the project's cascades' and the per-step batch norms of a cascaded
    user network (``cascadenet.cascade``) alike. Every batch norm a forward pass meets is a temporal one (a
    cascade's branches hold no other).

    Any other batch norm (``nn.BatchNorm1d`` in the head of a user's network, say) becomes ``nn.SyncBatchNorm``
    on a GPU; PyTorch synchronises those on GPUs only, so on the CPU they stay per process, said once in the log."""
    for m in model.modules():
        if isinstance(m, TemporalBatchNorm2d) and not isinstance(m, SyncTemporalBatchNorm2d):
            m.__class__ = _synced_class(type(m))
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, nn.SyncBatchNorm)]  # fmt: skip
    if plain:
        param = next(model.parameters(), None)
        if param is not None and param.device.type != "cpu":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            names = ", ".join(plain[:3]) + (" ..." if len(plain) > 3 else "")
            log.warning("%s: batch norms that PyTorch synchronises on GPUs only; on the CPU each process normalises "
                        "them with its own part of the batch", names)  # fmt: skip
    return model


@contextlib.contextmanager
def quiet_followers(world: World | None):
    """On ranks other than 0, the library logs warnings and errors only (rank 0 reports the run)."""
    logger = logging.getLogger("cascadenet")
    if world is None or world.main:
        yield
        return
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
