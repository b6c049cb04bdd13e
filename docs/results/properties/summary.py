"""Mean and spread over seeds of the property reports in this folder: writes summary.md.

    python docs/results/properties/summary.py docs/results/properties

Reads typicality-s*/typicality.json, early_exit-s*.json, noise-{td,ce}-s*/noise.json (every protocol, the model's
own trajectory length), ews70-{td,ce}-s*/noise.json (persistent noise over 70 steps), ood-td-s*/ood.json and
ood-heldout-footwear-s*/ood.json. Spread: the sample standard deviation over seeds (n - 1).
"""

import json
import statistics
import sys
from pathlib import Path

MODELS = {"td": "CascadedTD", "ce": "CascadedCE"}
NOTES = {"dataset:mnist": " (here: scikit-learn's UCI handwritten digits in MNIST's format, digits_to_idx.py)"}


def ms(values: list[float], scale: float = 100, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def load(folder: Path, pattern: str, name: str) -> list[dict]:
    return [json.loads((d / name).read_text()) for d in sorted(folder.glob(pattern)) if (d / name).is_file()]


def noise_tables(runs: list[dict], title: str) -> list[str]:
    methods = list(runs[0]["methods"])
    sigmas = runs[0]["sigmas"]
    lines = [
        f"### {title} ({len(runs)} seeds: {', '.join(str(r['seed']) for r in runs)}; seed = the model's training "
        f"seed and the noise seed; {runs[0]['num_examples']} test examples, {runs[0]['num_steps']} steps; runs "
        f"{', '.join(r['run'] for r in runs)})",
        "",
    ]
    for protocol in runs[0]["results"]:
        lines += [
            f"{protocol}: accuracy at the last step (%)",
            "",
            "| method | clean | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " |",
            "|---|---|" + "---|" * len(sigmas),
        ]
        for m in methods:
            cells = [ms([r["clean"][m]["final_accuracy"] for r in runs])]
            for i in range(len(sigmas)):
                cells.append(ms([r["results"][protocol][i]["methods"][m]["final_accuracy"] for r in runs]))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def ood_tables(runs: list[dict], title: str) -> list[str]:
    lines = [f"### {title} ({len(runs)} seeds)", ""]
    for name, first in runs[0]["ood_sets"].items():
        lines += [f"{name}: {first['title']}{NOTES.get(name, '')}", "", "| score | AUROC | FPR95 |", "|---|---|---|"]
        for score in first["scores"]:
            auroc = [r["ood_sets"][name]["scores"][score]["auroc"] for r in runs]
            fpr = [r["ood_sets"][name]["scores"][score]["fpr95"] for r in runs]
            lines.append(f"| {score} | {ms(auroc, 1, 3)} | {ms(fpr, 1, 3)} |")
        if "learned" in first["scores"] and "learned_last" in first["scores"]:
            scores = [r["ood_sets"][name]["scores"] for r in runs]
            gain = [sc["learned"]["auroc"] - sc["learned_last"]["auroc"] for sc in scores]
            lines.append(f"| trace beyond the last exit (learned - learned_last) | {ms(gain, 1, 3)} | |")
        lines.append("")
    return lines


def typicality_tables(reports: list[dict]) -> list[str]:
    """Per model (the run name without its seed), over the seeds' reports: the Spearman correlations and the
    settle steps of the least and most typical bins."""
    by_model: dict[str, list[dict]] = {}
    for report in reports:
        for run in report["runs"]:
            by_model.setdefault(run["name"].rsplit("-s", 1)[0], []).append(run)
    est = reports[0]["scores"]["options"]
    lines = [
        f"### CascadedTD, CascadedCE and SDN on the same validation examples ({len(reports)} seeds; estimator "
        f"{est['folds']} folds x {est['repeats']} repeats, so the score takes {est['repeats'] + 1} values; "
        f"{reports[0]['num_bins']} bins, 1 = least typical)",
        "",
        "Settle step: the first exit from which the example stays correct (wrong at the last exit: the number of "
        "exits). Spearman: rank correlation with the settle step (negative: typical examples settle sooner); "
        "final-correct: only the examples correct at the last exit (no imputed settle steps).",
        "",
        "| model | exits | Spearman (score) | Spearman (bin) | Spearman, final-correct | settle step, final-correct, "
        "bin 1 -> bin 5 | never settled, bin 1 | never settled, bin 5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, runs in by_model.items():
        first = [r["bins"][0] for r in runs]
        last = [r["bins"][-1] for r in runs]
        lines.append(
            f"| {model} | {runs[0]['num_exits']} | {ms([r['spearman_score_settle'] for r in runs], 1, 3)} | "
            f"{ms([r['spearman_bin_settle'] for r in runs], 1, 3)} | "
            f"{ms([r['spearman_score_settle_final_correct'] for r in runs], 1, 3)} | "
            f"{ms([b['mean_settle_step_final_correct'] for b in first], 1, 2)} -> "
            f"{ms([b['mean_settle_step_final_correct'] for b in last], 1, 2)} | "
            f"{ms([b['never_settled'] for b in first])}% | {ms([b['never_settled'] for b in last])}% |"
        )
    share = [
        sum(1 for score in r["examples"]["score"] if score >= 1.0) / len(r["examples"]["score"])
        for r in reports
        if isinstance(r.get("examples"), dict) and "score" in r["examples"]
    ]
    if share:
        lines += ["", f"Share of examples with the top score (1.0): {ms(share)}%."]
    return lines + [""]


def early_exit_table(reports: list[dict]) -> list[str]:
    """The validation-chosen operating point of each seed and its test-split row."""
    lines = [
        f"### Batched early exit at the operating point chosen on validation ({len(reports)} seeds)",
        "",
        "| run | threshold (val) | val accuracy / last step | test accuracy | test last step | mean step | MACs "
        "| vs `model(x)` | vs `anytime` to the end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        op = r["operating_point"]
        rows = {row["variant"]: row for row in r["rows"]}
        at = rows[f"exit@{op['threshold']:g}"]
        lines.append(
            f"| {Path(r['meta']['run_dir']).name} | {op['threshold']:g} | {op['val_accuracy'] * 100:.2f} / "
            f"{op['val_last_step'] * 100:.2f}% | {at['accuracy'] * 100:.2f}% | {rows['engine']['accuracy'] * 100:.2f}% "
            f"| {at['mean_step']:.2f} | {at['macs_fraction'] * 100:.1f}% | {at['speedup_vs_engine']:.2f}x | "
            f"{rows['anytime']['seconds'] / at['seconds']:.2f}x |"
        )
    meta = reports[0]["meta"]
    return lines + [
        "",
        f"{meta['examples']} test examples, batches of {meta['batch']}, {meta['device']}, {meta['threads']} "
        f"thread(s), torch {meta['torch']}; the times are medians of interleaved repeats (benchmarks/early_exit.py).",
        "",
    ]


def main(folder: str) -> None:
    root = Path(folder)
    lines = [
        "# The properties over seeds (mean ± standard deviation)",
        "",
        "Written by `python docs/results/properties/summary.py docs/results/properties` from the reports in "
        "this folder; each report holds every number of its run. Which reproduction the runs come from (issue 17's or "
        "the one before it, whose names are the same for CascadedTD): docs/results/README.md.",
        "",
    ]
    if reports := load(root, "typicality-s*", "typicality.json"):
        lines += ["## Typicality", ""] + typicality_tables(reports)
    if reports := [json.loads(p.read_text()) for p in sorted(root.glob("early_exit-s*.json"))]:
        lines += ["## Early exit", ""] + early_exit_table(reports)
    lines += ["## Noise", ""]
    for key, model in MODELS.items():
        if runs := load(root, f"noise-{key}-s*", "noise.json"):
            lines += noise_tables(runs, f"{model}, every protocol")
        if runs := load(root, f"ews70-{key}-s*", "noise.json"):
            lines += noise_tables(runs, f"{model}, persistent noise over 70 steps")
    lines += ["## Out-of-distribution detection", ""]
    if runs := load(root, "ood-td-s*", "ood.json"):
        lines += ood_tables(runs, "CascadedTD trained on all classes: handwritten digits and synthetic OOD")
    if runs := load(root, "ood-heldout-footwear-s*", "ood.json"):
        lines += ood_tables(runs, "CascadedTD trained without footwear (classes 5, 7, 9)")
    (root / "summary.md").write_text("\n".join(lines))
    print(f"wrote {root / 'summary.md'}")


if __name__ == "__main__":
    main(sys.argv[1])
