"""Calibration per exit: ECE over equal-mass bins, temperatures fitted by NLL, the transformed outputs
(calibrated, product of experts) read the same way by eval, predict and early exit; `cascadenet calibrate`."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cascadenet.cli import main
from cascadenet.evaluation.calibration import (
    expected_calibration_error,
    fit_temperatures,
    read_temperatures,
    reliability,
)
from cascadenet.evaluation.early_exit import predict
from cascadenet.evaluation.outputs import POE_FLOOR, Outputs
from cascadenet.evaluation.policies import Confidence
from conftest import perturb_norms, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"


def test_ece_over_equal_mass_bins_by_hand():
    # confidences 0.9, 0.8, 0.7, 0.6 (two classes), correct, wrong, correct, correct; two bins of two examples
    p = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1)
    labels = torch.tensor([0, 1, 0, 0])
    # low bin (0.6, 0.7): accuracy 1, confidence 0.65; high bin (0.8, 0.9): accuracy 0.5, confidence 0.85
    assert expected_calibration_error(logits, labels, bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.35)
    r = reliability(logits, labels, bins=2)
    assert r["share"] == [0.5, 0.5]
    assert r["confidence"] == pytest.approx([0.65, 0.85]) and r["accuracy"] == [1.0, 0.5]
    # one bin: |mean accuracy - mean confidence|
    assert expected_calibration_error(logits, labels, bins=1) == pytest.approx(abs(0.75 - 0.75))
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(logits, labels, bins=0)


def test_temperatures_recover_the_one_that_generated_the_labels():
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(3, 20000, 5, generator=g, dtype=torch.float64)
    true_t = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64)
    labels = torch.multinomial((z[1] / 1.0).softmax(-1), 1, generator=g).squeeze(1)  # one label per example
    # each exit's logits are the generating logits times T: exit e is calibrated at temperature true_t[e]
    scaled = z[1][None] * true_t[:, None, None]
    temps = fit_temperatures(scaled, labels)
    assert temps == pytest.approx(true_t.tolist(), rel=0.05)
    # scaling fixes the calibration error and never changes the argmax
    before = expected_calibration_error(scaled[2], labels)
    after = expected_calibration_error(scaled[2] / temps[2], labels)
    assert after < 0.02 < before
    assert torch.equal((scaled / torch.tensor(temps)[:, None, None]).argmax(-1), scaled.argmax(-1))


def test_product_of_experts_matches_the_formula_and_its_online_form():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, 4, generator=g, dtype=torch.float64) * 3
    out = Outputs(temperatures=(1.0, 2.0, 0.5, 1.0, 3.0), poe=True, first_exit=1).transform(z)
    temps = [1.0, 2.0, 0.5, 1.0, 3.0]
    assert torch.allclose(out[0], z[0])  # before the first informative exit: the exit's own (scaled) output
    for t in range(1, 5):
        prod = torch.ones(7, 4, dtype=torch.float64)
        for i in range(1, t + 1):
            prod = prod * ((z[i] / temps[i]).clamp(min=0) + POE_FLOOR) ** (i / 4)  # weights 1/4 .. 4/4
        assert torch.allclose(out[t].exp(), prod / prod.sum(-1, keepdim=True))
    # raw outputs are the logits themselves
    assert Outputs().transform(z) is not None and torch.equal(Outputs().transform(z), z)
    assert Outputs(poe=True).name == "poe" and Outputs((1.0,) * 5, True).name == "calibrated-poe"


@pytest.mark.parametrize("outputs", [Outputs(poe=True, first_exit=1), Outputs(tuple(0.5 + 0.1 * t for t in range(8)))])
def test_early_exit_reads_the_transformed_outputs_as_a_replay_does(outputs):
    torch.manual_seed(0)
    model = tiny_model("resnet10", num_classes=6, num_steps=8).double().eval()
    perturb_norms(model, seed=3)
    with torch.no_grad():
        for head in model.heads:
            head.weight.mul_(40)
    x = torch.randn(24, 3, 16, 16, dtype=torch.float64)
    assert model.first_informative_exit == 1
    with torch.no_grad():
        probs = outputs.transform(model(x)).softmax(-1)
    q = probs[1:].max(-1).values.median().item()
    got = predict(model, x, Confidence(q), outputs=outputs)
    steps = Confidence(q).stopping_steps(probs, 1)
    assert got.early_exit and len(set(got.steps.tolist())) > 1
    assert got.steps.tolist() == steps.tolist()
    assert got.predictions.tolist() == probs[steps, torch.arange(24)].argmax(-1).tolist()


def test_cli_calibrate_eval_predict_and_reliability_plot(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    # --calibrated before `cascadenet calibrate`: one line saying what to run
    assert main(["eval", str(run), "--calibrated"]) == 2
    assert "cascadenet calibrate" in capsys.readouterr().err
    assert main(["calibrate", str(run)]) == 0
    assert "temperature" in capsys.readouterr().out
    record = json.loads((run / "temperatures.json").read_text())
    temps = read_temperatures(run)
    assert temps == record["temperatures"] and all(t > 0 for t in temps)
    assert record["fit_split"] == "val" and len(record["val_ece_per_exit"]) == len(temps)
    # the temperatures minimise the validation NLL: their validation ECE is no worse than the raw one in total
    assert sum(record["val_ece_per_exit_calibrated"]) <= sum(record["val_ece_per_exit"]) + 1e-9
    # never replaced without --overwrite
    assert main(["calibrate", str(run)]) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["calibrate", str(run), "--overwrite"]) == 0

    assert main(["eval", str(run)]) == 0
    raw = json.loads((run / "eval.json").read_text())
    assert raw["outputs"] == "raw" and raw["temperatures"] == temps
    assert len(raw["ece_per_exit"]) == len(raw["ece_per_exit_calibrated"]) == raw["num_steps"]
    assert raw["ece_per_exit_evaluated"] == raw["ece_per_exit"]
    assert len(raw["reliability"]["raw"][0]["confidence"]) == min(15, raw["num_examples"])
    assert main(["eval", str(run), "--calibrated"]) == 0
    cal = json.loads((run / "eval-calibrated.json").read_text())
    assert cal["outputs"] == "calibrated" and cal["ece_per_exit_evaluated"] == pytest.approx(
        cal["ece_per_exit_calibrated"]
    )
    assert cal["accuracy_per_step"] == raw["accuracy_per_step"]  # temperatures never change an argmax
    assert main(["eval", str(run), "--poe"]) == 0
    poe = json.loads((run / "eval-poe.json").read_text())
    assert poe["outputs"] == "poe" and poe["accuracy_per_step"][0] == raw["accuracy_per_step"][0]

    capsys.readouterr()
    assert main(["predict", str(run), "--threshold", "0.5", "--poe", "--calibrated"]) == 0
    assert "calibrated-poe outputs" in capsys.readouterr().out
    # predict and the policies use the run's temperatures when present, unless --no-calibrated
    assert main(["predict", str(run), "--threshold", "0.5"]) == 0
    assert "calibrated outputs" in capsys.readouterr().out
    assert main(["predict", str(run), "--threshold", "0.5", "--no-calibrated"]) == 0
    assert "outputs" not in capsys.readouterr().out.splitlines()[0]

    out = tmp_path / "rel.png"
    assert main(["plot", str(run), "--reliability", "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(run), "--reliability", "-o", str(out)]) == 2  # never over a file without --overwrite


def test_stored_temperatures_are_checked(tmp_path):
    (tmp_path / "temperatures.json").write_text(json.dumps({"temperatures": [1.0, -2.0]}))
    with pytest.raises(Exception, match="positive"):
        read_temperatures(tmp_path)
    (tmp_path / "temperatures.json").write_text(json.dumps({"temperatures": [1.0, 2.0]}))
    with pytest.raises(Exception, match="3 exits"):
        read_temperatures(tmp_path, 3)
    assert read_temperatures(tmp_path, 2) == [1.0, 2.0]
    assert not math.isnan(np.float64(read_temperatures(tmp_path)[0]))
