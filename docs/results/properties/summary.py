"""Mean and spread over seeds of the noise and OOD reports in this folder: writes summary.md.

    python docs/results/properties/summary.py docs/results/properties

Reads noise-{td,ce}-s*/noise.json (every protocol, the model's own trajectory length), ews70-{td,ce}-s*/noise.json
(persistent noise over 70 steps), ood-td-s*/ood.json and ood-heldout-footwear-s*/ood.json. Spread: the sample
standard deviation over seeds (n - 1).
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
        f"seed and the noise seed; {runs[0]['num_examples']} test examples, {runs[0]['num_steps']} steps)",
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
        lines.append("")
    return lines


def main(folder: str) -> None:
    root = Path(folder)
    lines = [
        "# Noise and OOD over seeds (mean ± standard deviation)",
        "",
        "Written by `python docs/results/properties/summary.py docs/results/properties` from the reports in "
        "this folder; each report holds every number of its run.",
        "",
    ]
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
