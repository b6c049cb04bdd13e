"""`cascadenet reproduce` end to end on the synthetic dataset with a tiny recipe: every model trained and
evaluated, the lambda chosen on validation, finished runs reused, interrupted ones resumed, a run with other
options refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cascadenet.training.loop as train_module
from cascadenet.data.datasets import DataError
from cascadenet.experiments.reproduce import ENTRIES, Budget, reproduce

TINY = Budget(description="tiny", arch="resnet10", width=4, stem="cifar_pool", epochs=2, batch_size=32,
              max_batches=2, warmup_epochs=0.5, sweep=(0.0, 1.0), tuning_seeds=1)  # fmt: skip


def _run(out, **kw):
    options = dict(seeds=1, out=out, threads=None, device="cpu", progress=False, synthetic_size=160, recipe=TINY)
    return reproduce("synthetic", budget="tiny", **{**options, **kw})


def test_reproduce_end_to_end_reuse_resume_and_refusal(tmp_path, monkeypatch):
    # interrupt the second training in its second epoch, as Ctrl-C would (it stops at its epoch-1 checkpoint)
    calls = {"n": 0}
    real_epoch = train_module._train_epoch

    def interrupted_epoch(s):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real_epoch(s)

    monkeypatch.setattr(train_module, "_train_epoch", interrupted_epoch)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    monkeypatch.setattr(train_module, "_train_epoch", real_epoch)

    report = _run(tmp_path)
    root = tmp_path / "synthetic-tiny"
    record = json.loads((root / "synthetic.json").read_text())
    text = report.read_text()
    for entry in ENTRIES:
        assert f"| {entry.label} |" in text
        assert len(record["per_seed"][entry.key]) == 1
    how = record["how"]
    assert sorted(how.values()).count("resumed") == 1  # the interrupted run went on from its checkpoint
    # an equal tuning budget: every trained model offered two configurations, chosen by validation MACs AUC, and
    # the reported seed-0 run is the tuning run of the chosen value
    tuning = record["tuning"]
    assert set(tuning) == {"cascaded-td", "cascaded-td-mh", "serial-td", "serial-td-mh", "ce", "sdn", "sdn-ic-only",
                           "sdn-stem", "msdnet"}  # fmt: skip
    assert {len(t["offered"]) for t in tuning.values()} == {2}
    assert tuning["ce"]["option"] == "lr" and tuning["ce"]["offered"] == [0.1, 0.05]
    assert tuning["sdn-ic-only"]["offered"] == [1e-3, 5e-4]
    td = tuning["cascaded-td"]
    aucs = {r["value"]: r["val_macs_auc"] for r in td["rows"]}
    best = max((0.0, 1.0), key=lambda lam: (aucs[lam], -lam))
    assert td["chosen"] == best
    assert record["models"]["cascaded-td"]["runs"] == [f"runs/cascaded-td-lam{best:g}-s0"]
    # the headline statistics: CascadedTD against each headline model at every block latency, paired over seeds
    # and bootstrapped over test examples
    stats = record["statistics"]
    assert {r["b"] for r in stats} == {"cascaded-ce", "sdn", "sdn-stem", "msdnet", "serial-td-mh"}
    assert {r["axis"] for r in stats} == {"latency_blocks", "latency_layers", "macs"}
    first = next(r for r in stats if r["b"] == "sdn" and r["axis"] == "latency_blocks" and r["budget"] == 1.0)
    assert first["bootstrap"]["low"] <= first["bootstrap"]["difference"] <= first["bootstrap"]["high"]
    assert "Is the difference real?" in text
    # the stem-IC SDN has one exit more than SDN, at one block unit
    assert record["per_seed"]["sdn-stem"][0]["parallel_latency_blocks"][0] == 1.0
    assert len(record["per_seed"]["sdn-stem"][0]["accuracy_per_step"]) == len(
        record["per_seed"]["sdn"][0]["accuracy_per_step"]) + 1  # fmt: skip
    # CascadedCE and SerialCE are one training evaluated in two schemes
    assert record["models"]["cascaded-ce"]["runs"] == record["models"]["serial-ce"]["runs"]
    assert record["per_seed"]["serial-ce"][0]["scheme"] == "serial"
    # the cost fractions are relative to CascadedTD's full serial cost: at 100% CascadedTD has its final accuracy
    td = record["models"]["cascaded-td"]
    assert td["accuracy_at_100pct_td_cost"]["mean"] == pytest.approx(td["final_accuracy"]["mean"])
    for name in ("synthetic-latency.png", "synthetic-macs.png", "synthetic-budgeted.png"):
        assert (root / name).is_file()

    # run again: everything is reused, nothing retrained, the same numbers
    weights = {p: p.read_bytes() for p in (root / "runs").glob("*/model.safetensors")}
    again = json.loads((_run(tmp_path).parent / "synthetic.json").read_text())
    assert set(again["how"].values()) == {"reused"}
    assert again["models"]["cascaded-td"]["final_accuracy"] == record["models"]["cascaded-td"]["final_accuracy"]
    assert {p: p.read_bytes() for p in weights} == weights

    # another recipe in the same folder: refused naming the option, nothing changed
    other = Budget(**{**TINY.__dict__, "lr": 0.05})
    with pytest.raises(ValueError, match=r"--lr 0.1, but this would train --lr 0.05"):
        _run(tmp_path, recipe=other)
    assert {p: p.read_bytes() for p in weights} == weights


def test_reproduce_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        reproduce("synthetic", budget="huge", out=tmp_path)
    with pytest.raises(ValueError, match="--seeds must be a positive integer"):
        reproduce("synthetic", seeds=0, out=tmp_path)
    with pytest.raises(ValueError, match="unknown --models resnet"):
        reproduce("synthetic", models=("resnet",), out=tmp_path)
    with pytest.raises(ValueError, match="the same number of configurations"):
        reproduce("synthetic", recipe=Budget(**{**TINY.__dict__, "lrs": (0.1,)}), out=tmp_path)
    with pytest.raises(DataError):
        reproduce("cifar10", data_root=str(tmp_path / "nowhere"), out=tmp_path)
    assert not any(tmp_path.iterdir())


KILLED = """
import logging, sys
from cascadenet.experiments.reproduce import reproduce
from test_reproduce import TINY
logging.basicConfig(level=logging.INFO, format="%(message)s")
reproduce("synthetic", budget="tiny", seeds=1, out=sys.argv[1], threads=1, device="cpu", progress=False,
          synthetic_size=160, recipe=TINY)
"""


@pytest.mark.slow  # about 30 s on an idle 2-core machine; the Ctrl-C resume above runs in CI
def test_reproduce_resumes_after_a_kill(tmp_path):
    # a real SIGKILL of the whole command just after the second run's first-epoch checkpoint
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent / "src"), str(here)])}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stderr=subprocess.PIPE, text=True, env=env)
    seen = 0
    for line in proc.stderr:
        seen += line.startswith("epoch 1/2")
        if seen == 2:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert seen == 2 and proc.returncode == -signal.SIGKILL
    record = json.loads((_run(tmp_path).parent / "synthetic.json").read_text())
    assert list(record["how"].values())[:2] == ["reused", "resumed"]
