"""Anytime prediction with early exit: each example stops at the step its stopping policy chooses, and the
examples that stopped are no longer computed.

``predict(model, x, policy)`` runs a cascade through ``model.anytime(x)``: after each step the policy
(``cascadenet.evaluation.policies``) looks at the softmax outputs so far of the examples still running, those it stops
leave the batch, and the next step is computed for the others only. A model without ``anytime`` (any other
family of the anytime-model interface) is run whole, ``model(x)``, and each example's exit is picked
afterwards: the same predictions, steps and per-example costs, but not the saving in time.

``predict_run(run_dir, ...)`` (the ``cascadenet predict`` command) does it for a split of a run's dataset and
writes each example's prediction, stopping step and cost.
"""

from __future__ import annotations

import io
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.loader import iterate_batches, num_batches
from ..runs.load import load_run
from ..utils.device import autocast
from ..utils.files import atomic_write, check_npz_output
from .deadline import Deadline
from .outputs import Outputs, outputs_for
from .policies import Confidence, Margin, Policy, StableArgmax, budget_steps

__all__ = ["Predictions", "predict", "predict_run", "policy_from_flags", "format_summary"]


@dataclass
class Predictions:
    """What ``predict`` decided for each example of a batch (CPU tensors, ``(N,)`` each).

    Attributes:
        predictions: the predicted class (the argmax at the stopping step).
        steps: the stopping step (exit).
        macs: the cumulative multiply-accumulates per example up to the stopping step (``exit_costs``'s count).
        early_exit: whether the examples really stopped there (``model.anytime``); False when every exit was
            computed and the exits picked afterwards.
        macs_spent: the multiply-accumulates actually computed for the whole batch.
        probabilities: ``(N, C)`` float32, the softmax at the stopping step (the prediction's probability is its
            largest entry).
    """

    predictions: Tensor
    steps: Tensor
    macs: Tensor
    early_exit: bool
    macs_spent: int
    probabilities: Tensor | None = None

    @property
    def confidence(self) -> Tensor:
        """``(N,)`` the probability of each predicted class."""
        if self.probabilities is None:
            raise ValueError("these predictions hold no probabilities")
        return self.probabilities.gather(1, self.predictions[:, None])[:, 0]

    @staticmethod
    def cat(parts: list[Predictions]) -> Predictions:
        """The predictions of consecutive batches as one."""
        probs = [p.probabilities for p in parts]
        return Predictions(
            torch.cat([p.predictions for p in parts]),
            torch.cat([p.steps for p in parts]),
            torch.cat([p.macs for p in parts]),
            all(p.early_exit for p in parts),
            sum(p.macs_spent for p in parts),
            None if any(p is None for p in probs) else torch.cat(probs),  # type: ignore[arg-type]
        )


@torch.no_grad()
def predict(
    model: nn.Module,
    x: Tensor,
    policy: Policy | None = None,
    *,
    budget: float | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] | None = None,
    outputs: Outputs | None = None,
    **run_options: Any,
) -> Predictions:
    """Each example's prediction at the step its policy stops it, with real early exit for cascades.

    With ``model.anytime`` (cascaded ResNets) the steps are computed one at a time and the examples that stop
    leave the batch, so the later steps cost only the examples still running. Without it (other model
    families: only ``model(x) -> (E, B, C)`` and ``exit_costs`` are used), every exit is computed and each
    example's exit picked afterwards by the policy's offline form: the predictions, steps and per-example
    costs are the same, but the time is that of running every exit (``early_exit`` is then False).

    The model is put in evaluation mode for the call (and back).

    Args:
        model: an anytime model.
        x: a batch ``(B, C, H, W)``, normalised as the model expects (``model.preprocess`` of a loaded model).
        policy: when to stop (``cascadenet.evaluation.policies``); None runs every example to the last step (or budget).
        budget: a cap on the cumulative MACs per example: no example goes past the last step within it
            (``ValueError`` when even the model's first informative exit is over it).
        deadline: seconds of wall-clock time from the call: a step is started only if it is expected to finish
            by then (``cascadenet.evaluation.deadline``: from the step times measured in this call), and the
            examples still running when the next step would not fit stop at the step they have. The first
            informative step is always computed (before it there is no answer). Needs ``model.anytime``.
        clock: the clock the deadline is measured with (default ``time.perf_counter``; tests inject one). It is
            read once at the start and once after each step.
        outputs: the exits' outputs the policy and the prediction read (``cascadenet.evaluation.outputs``: raw
            when None, calibrated, product of experts).
        run_options: passed to ``model.anytime``/``model(x)`` and ``exit_costs`` (a cascade's ``scheme``,
            ``num_steps``).
    """
    if policy is not None and not isinstance(policy, Policy):
        raise ValueError(
            f"policy must be a cascadenet.evaluation.policies.Policy (or None), got {type(policy).__name__}"
        )
    timer = None if deadline is None else Deadline(deadline, clock)
    if timer is not None and not hasattr(model, "anytime"):
        raise ValueError(f"a deadline needs a model that runs step by step (model.anytime); a {type(model).__name__} "
                         "computes every exit at once")  # fmt: skip
    outputs = outputs if outputs is not None else Outputs()
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "anytime"):
            return _early_exit(model, x, policy, budget, run_options, timer, outputs)
        return _every_exit(model, x, policy, budget, run_options, outputs)
    finally:
        model.train(was_training)


def _early_exit(
    model: Any,
    x: Tensor,
    policy: Policy | None,
    budget: float | None,
    options: dict,
    timer: Deadline | None = None,
    outputs: Outputs = Outputs(),  # noqa: B008 (frozen: immutable)
) -> Predictions:
    first = model.first_informative_exit
    run = model.anytime(x, **options)
    step_macs = run.step_macs()
    costs = list(itertools.accumulate(step_macs))
    last = len(costs) - 1 if budget is None else budget_steps(costs, budget, first)
    n = x.shape[0]
    predictions = torch.empty(n, dtype=torch.long, device=x.device)
    steps = torch.empty(n, dtype=torch.long, device=x.device)
    probabilities: Tensor | None = None
    trace: list[Tensor] = []  # softmax outputs so far of the rows still running
    state = None  # the product of experts' running product of the rows still running
    for s in run:
        if timer is not None:
            timer.done(step_macs[s.step] * s.logits.shape[0])
        stop: Tensor
        out, state = outputs.step(s.step, s.logits, len(costs), state)
        out_of_time = (
            timer is not None and s.step >= first and s.step < last
            and not timer.fits(step_macs[s.step + 1] * s.logits.shape[0])
        )  # fmt: skip
        if s.step == last or out_of_time:
            stop = torch.ones(s.logits.shape[0], dtype=torch.bool, device=x.device)
            probs = _softmax(out)
        elif policy is None:
            trace = []
            continue
        else:
            probs = _softmax(out)
            trace.append(probs)
            stop = policy.stop(trace, first)
        rows = s.indices[stop]
        if probabilities is None:
            probabilities = torch.zeros((n, probs.shape[-1]), dtype=torch.float32, device=x.device)
        probabilities[rows] = probs[stop].float()
        predictions[rows] = out[stop].argmax(dim=-1)
        steps[rows] = s.step
        if bool(stop.all()):
            break
        if bool(stop.any()):
            run.keep(~stop)
            trace = [p[~stop] for p in trace]
            state = state[~stop] if state is not None else None
    steps = steps.cpu()
    probs_cpu = None if probabilities is None else probabilities.cpu()
    return Predictions(predictions.cpu(), steps, torch.tensor(costs)[steps], True, run.macs_spent, probs_cpu)


def _every_exit(
    model: Any,
    x: Tensor,
    policy: Policy | None,
    budget: float | None,
    options: dict,
    outputs: Outputs = Outputs(),  # noqa: B008 (frozen: immutable)
) -> Predictions:
    first = model.first_informative_exit
    costs = list(model.exit_costs(tuple(x.shape[1:]), **options).macs)
    logits = outputs.transform(model(x, **options))  # (E, B, C)
    last = len(costs) - 1 if budget is None else budget_steps(costs, budget, first)
    probs = _softmax(logits[: last + 1])
    n = x.shape[0]
    if policy is None:
        steps = torch.full((n,), last, dtype=torch.long, device=probs.device)
    else:
        steps = policy.stopping_steps(probs, first).to(probs.device)
    chosen = probs[steps, torch.arange(n, device=probs.device)]
    predictions = chosen.argmax(dim=-1)
    steps = steps.cpu()
    return Predictions(predictions.cpu(), steps, torch.tensor(costs)[steps], False, n * costs[-1], chosen.float().cpu())


def _softmax(logits: Tensor) -> Tensor:
    """Probabilities at least in float32 (bf16 logits under autocast), in float64 for a float64 model."""
    return logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def policy_from_flags(
    threshold: float | None = None, margin: float | None = None, stable: int | None = None
) -> Policy | None:
    """The policy the ``cascadenet predict`` flags name (at most one of them), or None."""
    given = [
        (f, v) for f, v in (("--threshold", threshold), ("--margin", margin), ("--stable", stable)) if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give at most one stopping policy, got {' and '.join(f for f, _ in given)}")
    if not given:
        return None
    flag, value = given[0]
    try:
        if flag == "--threshold":
            return Confidence(value)
        if flag == "--margin":
            return Margin(value)
        return StableArgmax(value)
    except ValueError as e:  # the policy's message names its field: name the flag
        raise ValueError(f"{flag}: {e}") from None


def predict_run(
    run_dir: str | os.PathLike,
    *,
    split: str = "test",
    policy: Policy | None = None,
    budget: float | None = None,
    deadline: float | None = None,
    data_root: str | None = None,
    batch_size: int = 500,
    device: str = "auto",
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    calibrated: bool | None = None,
    poe: bool = False,
    other_data: bool = False,
) -> dict[str, Any]:
    """Predict a split of a run's dataset with early exit; optionally write the per-example results.

    Args:
        run_dir: a run directory written by ``cascadenet train``.
        split: ``test`` (default), ``val`` (the run's held-out validation split) or ``train`` (its training part).
        policy, budget: as for ``predict``.
        deadline: seconds per batch (``predict``'s ``deadline``).
        output: a ``.npz`` file to write: ``predictions``, ``steps``, ``macs`` (per example), ``labels``,
            ``probabilities`` ``(N, C)`` (the softmax at the stopping step) and ``classes`` (the names); never
            replaces an existing file unless ``overwrite``.
        calibrated, poe: the policy and the prediction read the temperature-scaled exits (``cascadenet calibrate``;
            None: when the run has them) or the product of experts (``cascadenet.evaluation.outputs``).
        other_data: accept a ``data_root`` holding other data than the run's (recorded in the summary).

    Returns:
        a summary: accuracy, mean stopping step, mean MACs per example (and the last step's for comparison),
        the wall time of the prediction (loading excluded), whether the exit was real.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if output is not None:  # before any work
        output = check_npz_output(output, "--output", overwrite)
    loaded = load_run(run_dir, split=split, data_root=data_root, device=device, other_data=other_data)
    model, ds = loaded.model, loaded.data
    input_size = tuple(ds.images.shape[1:])
    exit_macs = model.exit_costs(input_size).macs
    outputs = outputs_for(run_dir, model, len(exit_macs), calibrated=calibrated, poe=poe)
    result, label, wall = _predict_split(loaded, policy, budget, batch_size, progress, deadline, outputs)
    full = int(exit_macs[-1])
    summary = {
        "run": Path(run_dir).name,
        "split": split,
        "policy": repr(policy) if policy is not None else None,
        "outputs": outputs.name or "raw",
        "budget": budget,
        "deadline": deadline,
        "num_examples": len(label),
        "accuracy": float((result.predictions == label).float().mean()),
        "mean_step": float(result.steps.float().mean()),
        "mean_macs": float(result.macs.double().mean()),
        "macs_last_step": full,
        "early_exit": result.early_exit,
        "wall_seconds": wall,
        "output": None if output is None else str(output),
        "data": loaded.data_record,
    }
    if output is not None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, predictions=result.predictions.numpy(), steps=result.steps.numpy(),
                            macs=result.macs.numpy(), labels=label.numpy(), probabilities=result.probabilities.numpy(),
                            classes=np.array(ds.classes, dtype=str))  # fmt: skip
        atomic_write(output, buffer.getvalue(), overwrite=overwrite)
    return summary


def _predict_split(
    loaded: Any,
    policy: Policy | None,
    budget: float | None,
    batch_size: int,
    progress: bool,
    deadline: float | None = None,
    outputs: Outputs | None = None,
) -> tuple[Predictions, Tensor, float]:
    """Every batch of a loaded run's split predicted with early exit: the predictions, the labels and the wall
    time (the device synchronised before it is read)."""
    model, ds = loaded.model, loaded.data
    dev_type = ds.images.device.type
    parts, labels = [], []
    batches = iterate_batches(ds, batch_size, shuffle=False, augment=False, mean=loaded.mean, std=loaded.std)
    total = num_batches(len(ds), batch_size, False)
    start = time.perf_counter()
    for x, y in tqdm(batches, total=total, desc="predict", disable=not progress, leave=False):
        with autocast(dev_type, loaded.amp):
            parts.append(predict(model, x, policy, budget=budget, deadline=deadline, outputs=outputs))
        labels.append(y.cpu())
    if dev_type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return Predictions.cat(parts), torch.cat(labels), wall


def format_summary(summary: dict[str, Any]) -> str:
    """One screen: the policy, accuracy, mean step, mean cost against running every step, wall time."""
    policy = summary["policy"] or "none (last step)"
    if summary.get("outputs", "raw") != "raw":
        policy += f" on {summary['outputs']} outputs"
    budget = "" if summary["budget"] is None else f", budget {summary['budget']:g} MACs"
    how = "early exit" if summary["early_exit"] else "every exit computed, exits picked afterwards"
    lines = [
        f"{summary['run']} ({summary['num_examples']} {summary['split']} examples): policy {policy}{budget}",
        f"accuracy      {100 * summary['accuracy']:.2f}%",
        f"mean step     {summary['mean_step']:.2f}",
        f"mean MMACs    {summary['mean_macs'] / 1e6:.3f} per example "
        f"({100 * summary['mean_macs'] / max(summary['macs_last_step'], 1):.1f}% of the last step's "
        f"{summary['macs_last_step'] / 1e6:.3f})",
        f"wall time     {summary['wall_seconds']:.2f} s ({how})",
    ]
    data = summary.get("data") or {}
    if data.get("other_data"):
        lines.append(f"other data than the run's: {data.get('differs')} (--other-data)")
    if summary["output"]:
        lines.append(f"wrote {summary['output']}")
    return "\n".join(lines)
