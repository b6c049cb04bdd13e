"""The report of ``cascadenet reproduce``: each model's numbers summarised over seeds (mean and spread; costs as
fractions of CascadedTD's full serial cost; areas on one absolute axis shared by every model) and the markdown
report of the record (``cascadenet.experiments.reproduce``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

__all__ = [
    "BUDGETED_AT",
    "COST_FRACTIONS",
    "HEADLINE",
    "format_report",
    "headline_statistics",
    "latency_budgets",
    "shared_ranges",
    "summarize_reproduction",
]

# CascadedTD against each of these, where the reproduction has them (the headline comparisons)
HEADLINE = ("cascaded-ce", "sdn", "sdn-stem", "msdnet", "serial-td-mh")
STATS_AT = (0.25, 0.5)  # fractions of CascadedTD's full serial cost

COST_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
BUDGETED_AT = (0.25, 0.5)


def _mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds; None where any seed lacks the value (never reached)."""
    if not values or any(v is None for v in values):
        return {"mean": None, "std": None, "values": values}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "values": values}


def summarize_reproduction(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per model, mean and spread over seeds of the report's numbers (cost fractions relative to CascadedTD's full
    serial cost)."""
    from ..evaluation import metrics

    reference = per_seed["cascaded-td"][0]["macs_per_step"][-1]
    latencies = latency_budgets(per_seed)
    ranges = shared_ranges(per_seed)
    td_layers = per_seed["cascaded-td"][0].get("latency_layers") or [0.0]
    layer_budgets = [float(k) for k in range(1, int(td_layers[-1]) + 4)]
    out = {}
    for key, results in per_seed.items():
        rows: dict[str, list[Any]] = {}
        for r in results:
            acc = r["accuracy_per_step"]
            budgets = [f * reference for f in COST_FRACTIONS]
            at_budgets = metrics.accuracy_at_budgets(acc, r["macs_per_step"], budgets, r["model"]["num_classes"])
            n = r["model"]["num_classes"]
            layers = r.get("latency_layers")
            values = {
                "final_accuracy": acc[-1],
                "anytime_auc": r["anytime_auc"],
                "own_auc_macs": r["macs_auc"],
                "own_auc_latency": r["latency_auc"],
                "abs_auc_macs": metrics.absolute_cost_auc(acc, r["macs_per_step"], n, ranges["macs"]),
                "abs_auc_latency_blocks": metrics.absolute_cost_auc(
                    acc, r["parallel_latency_blocks"], n, ranges["latency_blocks"]
                ),
                "abs_auc_latency_layers": None
                if layers is None
                else metrics.absolute_cost_auc(acc, layers, n, ranges["latency_layers"]),
                **{
                    f"accuracy_at_layers_{lat:g}": None if layers is None else float(a)
                    for lat, a in zip(
                        layer_budgets,
                        metrics.accuracy_at_budgets(acc, layers or r["parallel_latency_blocks"], layer_budgets, n),
                    )
                },
                **{f"accuracy_at_{round(100 * f)}pct_td_cost": float(a) for f, a in zip(COST_FRACTIONS, at_budgets)},
                **{f"budgeted_at_{round(100 * f)}pct_td_cost": _budgeted_at(r, f * reference) for f in BUDGETED_AT},
                **{
                    f"accuracy_at_latency_{lat:g}": float(a)
                    for lat, a in zip(
                        latencies,
                        metrics.accuracy_at_budgets(
                            acc, r["parallel_latency_blocks"], latencies, r["model"]["num_classes"]
                        ),
                    )
                },  # fmt: skip
                "step_to_50pct": r["steps_to_50pct_accuracy"],
                "step_to_95pct": r["steps_to_95pct_accuracy"],
                "latency_to_50pct": r["latency_to_50pct_accuracy"],
                "latency_to_95pct": r["latency_to_95pct_accuracy"],
                "macs_to_50pct": r["macs_to_50pct_accuracy"],
                "macs_to_95pct": r["macs_to_95pct_accuracy"],
                "threshold_auc": r["threshold_auc"],
                "full_macs": r["macs_per_step"][-1],
                "train_seconds": r.get("train_seconds"),
            }
            for k, v in values.items():
                rows.setdefault(k, []).append(v)
        out[key] = {k: _mean_std(v) for k, v in rows.items()}
        out[key]["accuracy_per_step"] = np.mean([r["accuracy_per_step"] for r in results], axis=0).tolist()
        out[key]["macs_per_step"] = results[0]["macs_per_step"]
        out[key]["latency_per_step"] = results[0]["parallel_latency_blocks"]
        out[key]["latency_layers_per_step"] = results[0].get("latency_layers")
        out[key]["ic_after"] = results[0].get("ic_after")
        out[key]["model_config"] = results[0]["model"]
    return out


def shared_ranges(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """The one absolute range of each cost axis every model's area is computed over: the largest full cost
    (serial MACs; latency in block units; latency in layers) among the models compared."""
    finals = [r for results in per_seed.values() for r in results]
    return {
        "macs": float(max(r["macs_per_step"][-1] for r in finals)),
        "latency_blocks": float(max(r["parallel_latency_blocks"][-1] for r in finals)),
        "latency_layers": float(max((r.get("latency_layers") or [1.0])[-1] for r in finals)),
    }


def latency_budgets(per_seed: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Whole block units from 1 to three past CascadedTD's last step: where the report reads every model's accuracy
    on the parallel-latency axis."""
    last = per_seed["cascaded-td"][0]["parallel_latency_blocks"][-1]
    return [float(k) for k in range(1, int(last) + 4)]


def headline_statistics(
    per_seed: dict[str, list[dict[str, Any]]], correct: dict[str, list[Any]], resamples: int = 2000
) -> list[dict[str, Any]]:
    """CascadedTD against each ``HEADLINE`` model present: at every whole block latency up to CascadedTD's last,
    at every layer latency up to its last, and at 25/50% of its full serial cost, the per-seed paired t-test and
    the bootstrap interval over test examples of the accuracy difference (``evaluation.statistics.compare``).
    ``correct[key][s]`` is seed s's ``(E, N)`` per-exit, per-example correctness."""
    from ..evaluation import statistics

    td = per_seed["cascaded-td"][0]

    def upto(last: float) -> list[float]:
        return [float(k) for k in range(1, int(last) + 1)]

    axes = {
        "latency_blocks": ("parallel_latency_blocks", upto(td["parallel_latency_blocks"][-1])),
        "latency_layers": ("latency_layers", upto((td.get("latency_layers") or [0])[-1])),
        "macs": ("macs_per_step", [f * td["macs_per_step"][-1] for f in STATS_AT]),
    }
    rows = []
    for other in (k for k in HEADLINE if k in per_seed and k in correct):
        for axis, (key, budgets) in axes.items():
            for budget in budgets:
                held = {}
                for model in ("cascaded-td", other):
                    held[model] = [
                        statistics.correct_at_budget(c, r[key], budget, r["model"]["num_classes"])
                        for c, r in zip(correct[model], per_seed[model])
                        if r.get(key) is not None
                    ]
                if not held["cascaded-td"] or len(held["cascaded-td"]) != len(held[other]):
                    continue
                verdict = statistics.compare([float(h.mean()) for h in held["cascaded-td"]],
                                             [float(h.mean()) for h in held[other]], np.stack(held["cascaded-td"]),
                                             np.stack(held[other]), resamples=resamples)  # fmt: skip
                rows.append({"a": "cascaded-td", "b": other, "axis": axis, "budget": budget, **verdict})
    return rows


def _stats_table(record: dict[str, Any]) -> list[str]:
    """The headline comparisons: CascadedTD minus each model, in accuracy points, with the bootstrap interval
    over test examples and the paired test's p over seeds; * marks a significant difference."""
    rows = record.get("statistics") or []
    if not rows:
        return []
    labels = {k: m["label"] for k, m in record["models"].items()}
    td_macs = record["models"]["cascaded-td"]["macs_per_step"][-1]
    lines = ["", "## Is the difference real? CascadedTD minus each model (accuracy points)", "",
             "Cell: mean difference over seeds [95% bootstrap interval over test examples, paired draws], p of the "
             "paired t-test over seeds; * = significant (the interval excludes 0 and p < 0.05). With 2-3 seeds the "
             "t-test has 1-2 degrees of freedom: only large, consistent differences pass it.", ""]  # fmt: skip
    names = {"latency_blocks": "latency L (block units)", "latency_layers": "latency (layers)",
             "macs": "serial cost (fraction of CascadedTD's)"}  # fmt: skip
    for axis, title in names.items():
        here = [r for r in rows if r["axis"] == axis]
        if not here:
            continue
        budgets = sorted({r["budget"] for r in here})
        head = [f"{b / td_macs:.0%}" if axis == "macs" else f"{b:g}" for b in budgets]
        lines += [f"**{title}**", "", "| model | " + " | ".join(head) + " |", "|---" * (len(budgets) + 1) + "|"]
        for other in dict.fromkeys(r["b"] for r in here):
            cells = []
            for b in budgets:
                r = next((r for r in here if r["b"] == other and r["budget"] == b), None)
                if r is None:
                    cells.append("")
                    continue
                boot, p = r["bootstrap"], r["paired"]["p"]
                p_text = "-" if p is None else f"{p:.2g}"
                cells.append(f"{100 * boot['difference']:+.1f} [{100 * boot['low']:+.1f}, {100 * boot['high']:+.1f}] "
                             f"p={p_text}{' *' if r['significant'] else ''}")  # fmt: skip
            lines.append(f"| {labels.get(other, other)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _budgeted_at(result: dict[str, Any], cost: float) -> float | None:
    """Test accuracy of the budgeted-batch curve (thresholds fitted on validation) read at a mean cost, by linear
    interpolation between its operating points; None outside the range of mean costs the curve covers. Reading
    the curve at a cost chooses nothing on the test split."""
    curve = result.get("budgeted_batch")
    if not curve:
        return None
    order = np.argsort(curve["mean_macs"], kind="stable")
    x, y = np.asarray(curve["mean_macs"], float)[order], np.asarray(curve["accuracy"], float)[order]
    if not x[0] <= cost <= x[-1]:
        return None
    return float(np.interp(cost, x, y))


def _fmt(stat: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        reached = [v for v in stat["values"] if v is not None]
        return f"- ({len(reached)}/{len(stat['values'])})" if reached else "-"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def format_report(record: dict[str, Any], figures: dict[str, str]) -> str:
    """The markdown report of a reproduction's record: the main table, accuracy at parallel latencies, per-exit
    accuracy and cost, the lambda sweep, the plots and how it was made."""
    lines = _main_table(record) + _latency_table(record["models"]) + _layers_table(record["models"])
    lines += _stats_table(record) + _per_exit_table(record["models"]) + _own_table(record["models"])
    lines += _tuning_table(record["tuning"]) + _closing(record, figures)
    return "\n".join(lines)


def _main_table(record: dict[str, Any]) -> list[str]:
    """The title, what the columns mean, and a row per model: accuracy, areas and costs, mean ± std over seeds."""
    models = record["models"]
    n = len(record["seeds"])
    fractions = [round(100 * f) for f in COST_FRACTIONS]
    budgeted = [round(100 * f) for f in BUDGETED_AT]
    head = ("| model | final acc. | AUC (MACs) | AUC (latency, blocks) | AUC (latency, layers) | "
            + " | ".join(f"acc. @{f}% TD cost" for f in fractions)
            + "".join(f" | budgeted @{f}%" for f in budgeted) + " | latency to 50% | latency to 95%"
            + " | MMACs to 50% | MMACs to 95% |")  # fmt: skip
    lines = [
        f"# Reproduction: {record['dataset']}, budget {record['budget']}",
        "",
        f"Test split; mean ± standard deviation over {n} seed(s) ({', '.join(map(str, record['seeds']))}). "
        "Accuracies and areas in %. Recipe shared by every model: " + record["recipe"]["description"] + ".",
        "Configurations chosen on the validation split (equal tuning budget, table below): "
        + json.dumps({k: f"{t['option']} {t['chosen']:g}" for k, t in record["tuning"].items()})
        + ".",
        "",
        "- AUC (MACs), AUC (latency, blocks / layers): area under accuracy against absolute cost over one range shared "
        f"by every model (the largest full cost among them: {record['ranges']['macs'] / 1e6:.2f} MMACs, "
        f"{record['ranges']['latency_blocks']:g} block units, {record['ranges']['latency_layers']:g} layers), "
        "divided by that range; at a budget each model holds the answer of its last exit completed within it, "
        "chance before its first exit, its last answer after its final exit. Block units: the stem and each "
        "residual block one unit (the paper's). Layers: the critical path, every conv one unit, skip projections "
        "counted, parallel paths the max (both computed from the model's structure). Areas normalised by each "
        "model's own cost describe one model only and are in the per-model table below.",
        "- acc. @f% TD cost: accuracy of the last exit completed within f% of CascadedTD's full serial cost "
        f"({models['cascaded-td']['full_macs']['mean'] / 1e6:.2f} MMACs); chance if none.",
        "- budgeted @f%: the budgeted-batch curve (MSDNet's protocol: per-exit confidence thresholds fitted on the "
        "validation split for a range of target costs, applied to the test split) read at a mean cost of f% of "
        "CascadedTD's full serial cost (- where the curve does not reach that cost).",
        "- latency / MMACs to 50% / 95%: parallel latency (block units) and cumulative serial MACs of the first exit "
        "whose absolute accuracy reaches 50% / 95% (- where never reached; (k/n) where "
        "only k of n seeds reach it).",
        "",
        head,
        "|---" * (5 + len(fractions) + len(budgeted) + 4) + "|",
    ]
    for m in models.values():
        cells = [m["label"], _fmt(m["final_accuracy"], 100), _fmt(m["abs_auc_macs"], 100),
                 _fmt(m["abs_auc_latency_blocks"], 100), _fmt(m["abs_auc_latency_layers"], 100)]  # fmt: skip
        cells += [_fmt(m[f"accuracy_at_{f}pct_td_cost"], 100) for f in fractions]
        cells += [_fmt(m[f"budgeted_at_{f}pct_td_cost"], 100) for f in budgeted]
        cells += [_fmt(m["latency_to_50pct"]), _fmt(m["latency_to_95pct"])]
        cells += [_fmt(m["macs_to_50pct"], 1e-6, 2), _fmt(m["macs_to_95pct"], 1e-6, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _latency_table(models: dict[str, Any]) -> list[str]:
    """Each model's accuracy at whole parallel latencies (the axis of the paper's claim)."""
    prefix = "accuracy_at_latency_"
    latencies = sorted(float(k[len(prefix) :]) for k in models["cascaded-td"] if k.startswith(prefix))
    lines = [
        "",
        "## Accuracy at a parallel latency (block units: the stem and each block one unit)",
        "",
        "The answer available after L units (the last exit completed within L; chance before the first). "
        "The paper's claim lives on this axis.",
        "",
        "| model | " + " | ".join(f"L={lat:g}" for lat in latencies) + " |",
        "|---" * (len(latencies) + 1) + "|",
    ]
    for m in models.values():
        cells = [_fmt(m[f"{prefix}{lat:g}"], 100) for lat in latencies]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    return lines


def _layers_table(models: dict[str, Any]) -> list[str]:
    """Each model's accuracy at whole layer latencies (the critical path in layers)."""
    prefix = "accuracy_at_layers_"
    latencies = sorted(float(k[len(prefix) :]) for k in models["cascaded-td"] if k.startswith(prefix))
    lines = [
        "",
        "## Accuracy at a parallel latency in layers (the critical path: every conv one unit, skip projections "
        "counted)",
        "",
        "| model | " + " | ".join(f"{lat:g}" for lat in latencies) + " |",
        "|---" * (len(latencies) + 1) + "|",
    ]
    for m in models.values():
        cells = [_fmt(m[f"{prefix}{lat:g}"], 100) for lat in latencies]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    return lines


def _own_table(models: dict[str, Any]) -> list[str]:
    """Areas normalised by each model's own axis: one model's shape, not comparable across models."""
    lines = ["", "## Per model only: areas on each model's own axis (not comparable across models)", "",
             "| model | AUC (exit index / (E - 1)) | AUC (MACs / own full cost) | AUC (block latency / own) |",
             "|---|---|---|---|"]  # fmt: skip
    for m in models.values():
        cells = [_fmt(m["anytime_auc"], 100), _fmt(m["own_auc_macs"], 100), _fmt(m["own_auc_latency"], 100)]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    return lines


def _per_exit_table(models: dict[str, Any]) -> list[str]:
    """Each model's accuracy at every exit (mean over seeds) with the exit's MACs and latency."""
    lines = ["", "## Per-exit accuracy (mean over seeds, %) and cost", "",
             "| model | exits: accuracy % (cumulative MMACs, latency in blocks, in layers) |", "|---|---|"]  # fmt: skip
    for m in models.values():
        layers = m.get("latency_layers_per_step") or [None] * len(m["accuracy_per_step"])
        cells = [f"{100 * a:.1f} ({c / 1e6:.2f}, {lat:g}, {'-' if d is None else f'{d:g}'})" for a, c, lat, d in
                 zip(m["accuracy_per_step"], m["macs_per_step"], m["latency_per_step"], layers)]  # fmt: skip
        extra = f" (ICs after blocks {m['ic_after']})" if m.get("ic_after") is not None else ""
        lines.append(f"| {m['label']}{extra} | " + "; ".join(cells) + " |")
    return lines


def _tuning_table(tuning: dict[str, dict[str, Any]]) -> list[str]:
    """The equal tuning budget: per trained model, what it was offered, the validation MACs AUC of each value
    (mean over the tuning seeds) and what won."""
    lines = ["", "## Tuning (validation split; the same number of configurations for every model)", "",
             "| run | option | offered: validation MACs AUC % (mean over seeds) | chosen |",
             "|---|---|---|---|"]  # fmt: skip
    for key, t in tuning.items():
        cells = ", ".join(f"{v:g}: {100 * a:.2f}" for v, a in zip(t["offered"], t["mean_val_macs_auc"]))
        lines.append(f"| {key} | {t['option']} ({t['seeds']} seeds) | {cells} | {t['chosen']:g} |")
    return lines


def _closing(record: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """The plots, and how the reproduction was made: the command, the machine, the time, the runs."""
    n = len(record["seeds"])
    return [
        "",
        "## Plots",
        "",
        f"![accuracy against parallel latency]({figures['latency']})",
        *([f"![accuracy against latency in layers]({figures['layers']})"] if "layers" in figures else []),
        f"![accuracy against serial MACs]({figures['macs']})",
        f"![Pareto: every exit and the budgeted-batch curve on one absolute MACs axis]({figures['budgeted']})",
        "",
        "## How this was made",
        "",
        f"`cascadenet reproduce --dataset {record['dataset']} --seeds {n} --budget {record['budget']}"
        + (f" --models {' '.join(record['models_asked'])}" if record.get("models_asked") else "")
        + "` on "
        f"{record['machine']['cpu']} ({record['machine']['threads']} threads, torch {record['machine']['torch']}): "
        f"{len(record['how'])} runs, {record['train_seconds_total'] / 60:.1f} min of training in all (epochs and "
        f"validation); this invocation took {record['seconds'] / 60:.1f} min; runs trained, resumed or reused: "
        + ", ".join(f"{v} {sum(1 for h in record['how'].values() if h == v)}" for v in ("trained", "resumed", "reused"))
        + ". Every number is in the JSON file beside this report.",
        "",
    ]
