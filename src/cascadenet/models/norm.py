"""Temporal batch normalisation: one set of running statistics per time step.

A cascaded network sees very different activation statistics at different steps (at step 1 the deep layers
carry only what came through the skip connections), so each step t keeps its own running mean and variance
("slot" t) and, optionally, its own scale and shift. Steps past the last slot reuse the last slot.

The layer has two entry points that must agree exactly:
- ``forward(x, t)``: one step, as in the step loop.
- ``forward_groups(x, stat_slots, affine_slots)``: several distinct states at once, stacked as
  ``(B, G, C, H, W)``. The trajectory engine uses it to normalise every distinct state of a layer in one
  call while keeping each state's statistics separate (each group is normalised as if it were its own
  forward pass). Running statistics are not touched here: the caller applies ``update`` once per step, in
  step order, so the engine reproduces the step loop's updates exactly.

Unlike the published reference code (which passed options positionally and ended up with eps=0.1 and
momentum=1.0), eps and momentum have the standard PyTorch values. ``momentum=None`` is the cumulative average
(as ``nn.BatchNorm2d``'s): each slot counts its own updates, so a slot that receives several updates per forward
pass (steps past the last slot, or the feed-forward pass writing every slot) averages all of them equally;
``cascadenet.training.recalibrate`` uses it to recompute the statistics at the final weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TemporalBatchNorm2d"]


def _tracing() -> bool:
    """Inside ``torch.export``, ``torch.compile`` or ``torch.jit.trace``: the caches keyed on storage (data pointers,
    version counters) and the statistics compared by value are skipped, so that the traced program neither fails
    on tensors without storage nor guards on (and recompiles for) the values of the statistics."""
    compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(compiling is not None and compiling()) or torch.jit.is_tracing()


class TemporalBatchNorm2d(nn.Module):
    """Batch norm over ``(N, C, H, W)`` with ``num_slots`` sets of running statistics.

    Args:
        num_features: channel count C.
        num_slots: sets of running statistics (1 = ordinary batch norm shared by all steps).
        affine_slots: sets of scale/shift parameters (1 = shared by all steps).
        eps: added to the variance.
        momentum: weight of the new batch statistics in the running average; None: the cumulative average of
            every update since the counts ``slot_updates`` were last reset (``reset_running_stats``).
    """

    def __init__(
        self,
        num_features: int,
        num_slots: int = 1,
        affine_slots: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        if num_slots < 1 or affine_slots < 1:
            raise ValueError("num_slots and affine_slots must be >= 1")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(affine_slots, num_features))
        self.bias = nn.Parameter(torch.zeros(affine_slots, num_features))
        self.register_buffer("running_mean", torch.zeros(num_slots, num_features))
        self.register_buffer("running_var", torch.ones(num_slots, num_features))
        # plain ints: the engine asks for slots thousands of times per trajectory (the shapes never change:
        # load_state_dict refuses other shapes)
        self.num_slots = num_slots
        self.affine_slots = affine_slots
        # updates folded into each slot (what momentum=None divides by); not saved with the weights, as
        # nn.BatchNorm2d's num_batches_tracked would be: only a cumulative average in progress needs it
        self.slot_updates = [0] * num_slots

    def stat_slot(self, t: int) -> int:
        return t if t < self.num_slots else self.num_slots - 1

    def affine_slot(self, t: int) -> int:
        return t if t < self.affine_slots else self.affine_slots - 1

    def extra_repr(self) -> str:
        return f"{self.num_features}, slots={self.num_slots}, affine_slots={self.affine_slots}, eps={self.eps}"

    # ---- one step ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: int | None) -> Tensor:
        """Normalise one step. ``t=None`` is the settled feed-forward network: it uses the last slot and, in
        training, writes its batch statistics to every slot (the network is then an ordinary ResNet whose
        statistics hold at every step)."""
        if isinstance(t, Tensor):  # the step index as a tensor (exported step programs): evaluation only
            return self._forward_at(x, t)
        slot = self.num_slots - 1 if t is None else self.stat_slot(t)
        aslot = self.affine_slots - 1 if t is None else self.affine_slot(t)
        y, stats = self.forward_groups(x.unsqueeze(1), [slot], [aslot])
        if stats is not None:
            mean, var = stats
            for s in range(self.num_slots) if t is None else [slot]:
                self.update(s, mean[0], var[0])
        return y.squeeze(1)

    def _forward_at(self, x: Tensor, t: Tensor) -> Tensor:
        """Evaluation-mode ``forward(x, t)`` with the step a 0-d integer tensor: the slots are gathered by index,
        so that one traced program serves every step (the same operation as ``forward`` with an int step)."""
        if self.training:
            raise ValueError("a tensor step index is for evaluation (exported programs): call model.eval()")
        slot = t.reshape(1).clamp(max=self.num_slots - 1)
        aslot = t.reshape(1).clamp(max=self.affine_slots - 1)
        mean, var = (table.index_select(0, slot)[0] for table in (self.running_mean, self.running_var))
        weight, bias = (table.index_select(0, aslot)[0] for table in (self.weight, self.bias))
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)

    # ---- several distinct states at once ------------------------------------------------------------------
    def forward_groups(
        self, x: Tensor, stat_slots: list[int], affine_slots: list[int], count: int | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Normalise ``x`` of shape ``(B, G, C, H, W)``: group g with statistics ``stat_slots[g]`` (evaluation)
        or its own batch statistics (training), and parameters ``affine_slots[g]``.

        ``count`` marks a batch that stands for ``count`` identical samples stored once (B == 1): states that
        do not depend on the input. Normalising one copy gives the same output as normalising ``count``
        copies; only the unbiased variance of the running statistics needs the true count.

        Returns:
            the normalised tensor and, in training, the per-group batch mean and unbiased variance
            ``(G, C)`` for ``update``; ``None`` in evaluation.
        """
        b, g, c, h, w = x.shape
        if not self.training:
            mean, var, weight, bias = self._eval_params(stat_slots, affine_slots)
            y = F.batch_norm(x.reshape(b, g * c, h, w), mean, var, weight, bias, False, 0.0, self.eps)
            return y.view(b, g, c, h, w), None
        weight = self._gather(self.weight, affine_slots)  # (G*C,)
        bias = self._gather(self.bias, affine_slots)
        if count is None:
            # The fused kernel computes each group's statistics; with momentum 1 it writes exactly the batch
            # mean and unbiased variance into the scratch buffers, which is how we read them back for free.
            dtype = self.running_mean.dtype  # float32 under autocast, float64 for a double model
            mean = x.new_zeros(g * c, dtype=dtype)
            var = x.new_ones(g * c, dtype=dtype)
            y = F.batch_norm(x.reshape(b, g * c, h, w), mean, var, weight, bias, True, 1.0, self.eps)
            return y.view(b, g, c, h, w), (mean.view(g, c), var.view(g, c))
        # Input-independent states: normalise the single stored copy by hand (the fused kernel refuses a
        # single value per channel, and would use the wrong count for the unbiased variance). These states
        # are nearly constant fields (zeros pushed through biases and padding) whose variance is far below
        # eps, so normalising them multiplies rounding errors by up to 1/sqrt(eps); float64 keeps them exact.
        # They are batch-1 tensors, so the cost is negligible.
        xf = x.to(torch.float32 if x.device.type == "mps" else torch.float64)
        mean = xf.mean(dim=(0, 3, 4))  # (G, C)
        var = xf.var(dim=(0, 3, 4), unbiased=False)
        scale = torch.rsqrt(var + self.eps) * weight.view(g, c)
        y = (xf - mean[None, :, :, None, None]) * scale[None, :, :, None, None] + bias.view(1, g, c, 1, 1)
        n = count * b * h * w
        unbiased = var.detach() * (n / max(n - 1, 1))
        return y.to(x.dtype), (mean.detach().to(self.running_mean.dtype), unbiased.to(self.running_mean.dtype))

    def _eval_params(self, stat_slots: list[int], affine_slots: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Running mean, variance, scale and shift of each group, ``(G*C,)`` each.

        Without autograd they are cached per slot pattern: a trajectory asks for the same groups at every call,
        and gathering them is many small copies. An entry is used only while every table is the same tensor
        object with the same storage and version counter, so any change (an optimizer step, load_state_dict, a
        running-statistics update, a move to another device or dtype) recomputes it.
        """
        tables = (self.running_mean, self.running_var, self.weight, self.bias)

        def gather() -> tuple[Tensor, Tensor, Tensor, Tensor]:
            return (
                *(self._gather(t, stat_slots) for t in tables[:2]),
                *(self._gather(t, affine_slots) for t in tables[2:]),
            )  # type: ignore[return-value]

        if torch.is_grad_enabled() or _tracing():
            return gather()  # while tracing the tables are fake tensors without storage: nothing to key a cache on
        stamp = [(t, t.data_ptr(), t._version) for t in tables]
        cache = self.__dict__.setdefault("_eval_cache", {})
        key = (tuple(stat_slots), tuple(affine_slots))
        held = cache.get(key)
        if held is None or any(a is not b or p != q or v != w for (a, p, v), (b, q, w) in zip(held[0], stamp)):
            held = cache[key] = (stamp, gather())
        return held[1]

    @staticmethod
    def _gather(table: Tensor, slots: list[int]) -> Tensor:
        if all(s == slots[0] for s in slots):
            return table[slots[0]].repeat(len(slots))
        return table[torch.tensor(slots, device=table.device)].reshape(-1)

    @torch.no_grad()
    def reset_running_stats(self) -> None:
        """Running means 0, variances 1, and no updates counted (the start of a cumulative average)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.slot_updates = [0] * self.num_slots

    def _weight_of_new(self, slot: int) -> float:
        """The weight of the next update of ``slot``: the momentum, or 1/n for its n-th update (cumulative)."""
        self.slot_updates[slot] += 1
        return 1.0 / self.slot_updates[slot] if self.momentum is None else self.momentum

    @torch.no_grad()
    def update(self, slot: int, mean: Tensor, var: Tensor) -> None:
        """Fold one step's batch statistics into the running statistics of ``slot``."""
        m = self._weight_of_new(slot)
        self.running_mean[slot].mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var[slot].mul_(1 - m).add_(var.to(self.running_var.dtype), alpha=m)

    @torch.no_grad()
    def update_slots(self, slots: list[int], mean: Tensor, var: Tensor) -> None:
        """``update`` for several distinct slots at once: ``mean`` and ``var`` are ``(len(slots), C)``."""
        if len(slots) == self.num_slots and slots == list(range(self.num_slots)):
            index: slice | Tensor = slice(None)  # every slot, in order: no gather
        else:
            index = torch.tensor(slots, device=self.running_mean.device)
        weights = [self._weight_of_new(s) for s in slots]
        if self.momentum is not None:
            m = self.momentum
            for table, value in ((self.running_mean, mean), (self.running_var, var)):
                table[index] = table[index].mul_(1 - m).add_(value.to(table.dtype), alpha=m)
            return
        # cumulative: each slot its own weight 1/n, computed as update() would (same operations, same rounding)
        for table, value in ((self.running_mean, mean), (self.running_var, var)):
            w = torch.tensor(weights, dtype=table.dtype, device=table.device)[:, None]
            table[index] = table[index] * (1 - w) + value.to(table.dtype) * w

    def stat_classes(self) -> list[int]:
        """For each slot, the first slot with bit-identical running statistics.

        Slots that received identical updates all through training (the steps after a layer's input has
        settled) are interchangeable in evaluation; the engine then computes their outputs once.
        """
        if self.num_slots == 1:
            return [0]
        if _tracing():  # the comparison would be data-dependent: every slot its own class (the same numbers)
            return list(range(self.num_slots))
        m, v = self.running_mean, self.running_var
        key = (m.data_ptr(), m._version, v.data_ptr(), v._version)  # changes with every update of the statistics
        held = self.__dict__.get("_stat_classes")
        if held is None or held[0] != key:
            same = (m[:, None] == m[None]).all(-1) & (v[:, None] == v[None]).all(-1)  # (S, S)
            held = self.__dict__["_stat_classes"] = (key, same.int().argmax(dim=1).tolist())
        return list(held[1])
