"""Precise batch norm: statistics recomputed at the final weights (``cascadenet.training.recalibrate``), in training,
from the command line, and the defect they fix (saturated early steps of a stem-delayed cascade)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import cascadenet as cn
from cascadenet.cli import main
from cascadenet.data.datasets import load_dataset
from cascadenet.data.loader import iterate_batches, normalization
from cascadenet.evaluation.evaluate import eval_filename, evaluate
from cascadenet.models.checkpoint import load_checkpoint, read_metadata
from cascadenet.models.norm import TemporalBatchNorm2d
from cascadenet.models.precise_bn import recalibrate_bn
from cascadenet.training.loop import TrainConfig, train
from cascadenet.training.losses import td_loss
from conftest import perturb_norms, tiny_model
from test_train import small_cfg, weights

STATS = ("running_mean", "running_var")


# ----------------------------------------------------------------------------------------------------------------
# The defect and the fix


@pytest.fixture(scope="module")
def briefly_trained():
    """A stem-delayed resnet10 (width 4) after 6 SGD steps at lr 0.3 with TD(0.5) on the synthetic set: its
    weights moved far in few steps, so the running averages lag them (the user's report, in miniature)."""
    torch.manual_seed(0)
    ds = load_dataset("synthetic", None, "train", synthetic_size=192, seed=0)
    mean, std = normalization(ds)
    model = cn.create_model("resnet10", width=4, num_classes=ds.num_classes, in_channels=ds.num_channels)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for x, y in iterate_batches(ds, 32, shuffle=True, augment=True, mean=mean, std=std, generator=g, drop_last=True):
        loss = td_loss(model(x), y, 0.5, first_step=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = next(iterate_batches(ds, len(ds), shuffle=False, augment=False, mean=mean, std=std))
    return model, ds, mean, std, x, y


def confidence_and_accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        p = model(x).softmax(-1)  # (T, N, C)
    return p.max(-1).values, (p.argmax(-1) == y).float().mean(-1)


def test_recalibration_ends_the_saturated_early_steps(briefly_trained):
    model, ds, mean, std, x, y = briefly_trained
    conf, acc = confidence_and_accuracy(model, x, y)
    # before: step 1 (the first that sees the input) is certain of one class for every example, at chance
    assert conf[1].min() > 0.95 and conf[1].mean() > 0.99
    assert acc[1] <= 0.3  # 4 balanced classes
    g = torch.Generator().manual_seed(1)
    batches = iterate_batches(ds, 32, shuffle=True, augment=True, mean=mean, std=std, generator=g, drop_last=True)
    record = recalibrate_bn(model, batches)
    assert record == {"batches": 6, "examples": 192}
    conf2, acc2 = confidence_and_accuracy(model, x, y)
    assert conf2[1].mean() < 0.8 and conf2[1].min() < 0.5  # no longer saturated
    assert acc2[-1] > acc[-1] + 0.2  # and the last step recovers from chance too
    assert not model.training


# ----------------------------------------------------------------------------------------------------------------
# Exactness against references computed independently


def captured_inputs(model, layer_type, run):
    """Each call's input of every ``layer_type`` layer (and the step it was called for) while ``run()`` runs."""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args: seen.setdefault(m, []).append(args))
        for m in model.modules()
        if isinstance(m, layer_type)
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def batch_stats(x):
    """Per-channel mean and unbiased variance of ``(N, C, ...)``, in float64."""
    dims = [0, *range(2, x.ndim)]
    x = x.double()
    return x.mean(dims), x.var(dims, unbiased=True)


def test_plain_batch_norm_matches_the_union_of_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.BatchNorm1d(7)
    ).double()
    batches = [torch.randn(16, 3, 8, 8, dtype=torch.float64) * 3 + 1 for _ in range(5)]
    model.train()
    with torch.no_grad():
        seen = captured_inputs(model, nn.modules.batchnorm._BatchNorm, lambda: [model(x) for x in batches])
    model.eval()
    model[1].momentum = 0.3
    record = recalibrate_bn(model, [(x, torch.zeros(16)) for x in batches])
    assert record == {"batches": 5, "examples": 80}
    for bn in (model[1], model[5]):
        inputs = [args[0] for args in seen[bn]]
        stats = [batch_stats(x) for x in inputs]
        union = torch.cat(inputs).double()
        dims = [0, *range(2, union.ndim)]
        # equal batches: the mean is the union's mean; the variance the mean of the batches' unbiased variances
        torch.testing.assert_close(bn.running_mean, union.mean(dims), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, torch.stack([v for _, v in stats]).mean(0), rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == 5
    assert model[1].momentum == 0.3 and model[5].momentum == 0.1 and not model.training


@torch.no_grad()
def scramble_statistics(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    for bn in model.norms():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 3)


def reference_slot_stats(model, batches, run):
    """Per layer and slot, the average of the batch statistics of every step that uses the slot, from the step
    loop's inputs (``run(model, x)`` runs it), independent of the engine and of the running-statistics code."""
    model.train()
    with torch.no_grad():
        seen = captured_inputs(model, TemporalBatchNorm2d, lambda: [run(model, x) for x in batches])
    ref = {}
    for bn, calls in seen.items():
        per_slot = {}
        for x, t in calls:
            slots = range(bn.num_slots) if t is None else [bn.stat_slot(t)]
            for s in slots:
                per_slot.setdefault(s, []).append(batch_stats(x))
        ref[bn] = {s: [torch.stack(v).mean(0) for v in zip(*stats)] for s, stats in per_slot.items()}
    return ref


@pytest.mark.parametrize(
    "options, run_loop, run_engine",
    [
        # every slot its own step
        ({}, lambda m, x: m(x, method="loop"), None),
        # shared statistics: one slot takes every step's update in each forward pass
        ({"temporal_bn": False}, lambda m, x: m(x, method="loop"), None),
        # steps past the last slot: the last slot takes three updates per forward pass
        ({}, lambda m, x: m(x, num_steps=8, method="loop"), lambda m, x: m(x, num_steps=8)),
        # the feed-forward pass (--loss final) writes every slot
        ({}, lambda m, x: m.feedforward(x), lambda m, x: m.feedforward(x)),
    ],
    ids=["temporal", "shared", "past_last_slot", "feedforward"],
)
def test_every_slot_is_the_average_of_its_updates(options, run_loop, run_engine):
    model = tiny_model("resnet10", **options).double()  # 5 steps, stem delayed
    perturb_norms(model)
    batches = [torch.randn(6, 3, 8, 8, dtype=torch.float64) for _ in range(3)]
    ref = reference_slot_stats(model, batches, run_loop)
    scramble_statistics(model)  # whatever the statistics were, they are replaced
    recalibrate_bn(model, batches, forward=run_engine)  # default: the engine (model(x))
    for bn in model.norms():
        for s in range(bn.num_slots):
            mean, var = ref[bn][s]
            torch.testing.assert_close(bn.running_mean[s], mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(bn.running_var[s], var, rtol=1e-10, atol=1e-12)
        assert bn.momentum == 0.1


def test_slots_no_step_reaches_keep_their_values_and_the_result_is_deterministic():
    model = tiny_model("resnet10", scheme="serial")  # block k's residual is not computed before step k + 2
    perturb_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    recalibrate_bn(model, batches)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    last = model.blocks[-1].residual.units[0].bn
    name = next(n for n, m in model.named_modules() if m is last)
    unreached = [s for s in range(last.num_slots) if last.slot_updates[s] == 0]
    assert unreached  # the serial scheme leaves early slots of the deepest block unused
    for s in unreached:
        assert torch.equal(after[f"{name}.running_mean"][s], before[f"{name}.running_mean"][s])
    assert not torch.equal(after["stem.units.0.bn.running_mean"], before["stem.units.0.bn.running_mean"])
    scramble_statistics(model, seed=5)
    model.load_state_dict(before)
    recalibrate_bn(model, batches)
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())  # same batches, same bits


def test_an_interrupted_recalibration_puts_everything_back():
    model = tiny_model("resnet10")
    perturb_norms(model)
    model.eval()
    model.blocks[0].residual.units[0].train()  # a mixed mode is restored module by module
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batches():
        yield torch.randn(4, 3, 8, 8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recalibrate_bn(model, batches())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(bn.momentum == 0.1 for bn in model.norms())
    assert not model.training and model.blocks[0].residual.units[0].training
    assert not model.blocks[0].residual.units[1].training
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])


# ----------------------------------------------------------------------------------------------------------------
# Training, the command line, evaluation


def test_training_with_and_without_recalibration_differ_only_in_the_statistics(tmp_path, capsys):
    on = train(small_cfg(tmp_path / "on", epochs=1, recalibrate_batches=3))
    off = train(small_cfg(tmp_path / "off", epochs=1, recalibrate_batches=0))
    a, b = weights(on), weights(off)
    assert a.keys() == b.keys()
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ and all(k.endswith(STATS) for k in differ)
    # the checkpoint keeps the training state (the running averages), the same in both
    ca, cb = load_checkpoint(on / "checkpoint.pt")["model"], load_checkpoint(off / "checkpoint.pt")["model"]
    assert all(torch.equal(ca[k], cb[k]) for k in ca) and torch.equal(ca[next(iter(differ))], b[next(iter(differ))])
    record = {"batches": 3, "examples": 96}
    assert read_metadata(on / "model.safetensors")["recalibration"] == record
    assert "recalibration" not in read_metadata(off / "model.safetensors")
    row_on, row_off = (json.loads((r / "metrics.jsonl").read_text().splitlines()[-1]) for r in (on, off))
    assert row_on["bn_recalibration"] == record and "bn_recalibration" not in row_off
    assert row_on["train_loss"] == row_off["train_loss"]

    # `cascadenet recalibrate` on the run trained without draws the batches training draws: the same statistics
    assert main(["recalibrate", str(off), "--batches", "3", "--device", "cpu"]) == 0
    assert "model-recalibrated.safetensors" in capsys.readouterr().out
    c = load_file(str(off / "model-recalibrated.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    meta = read_metadata(off / "model-recalibrated.safetensors")
    assert meta["recalibration"] == record and meta["epochs"] == 1 and "normalization" in meta
    # never over an existing file: one line, exit 2, the file untouched
    stamp = (off / "model-recalibrated.safetensors").stat().st_mtime_ns
    assert main(["recalibrate", str(off), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and "nothing was written" in err[0]
    assert (off / "model-recalibrated.safetensors").stat().st_mtime_ns == stamp
    # evaluating the new weights writes its own file
    result = evaluate(off, weights="model-recalibrated.safetensors", device="cpu")
    assert (off / "eval-recalibrated.json").is_file() and not (off / "eval.json").exists()
    assert result["weights"] == "model-recalibrated.safetensors"
    assert main(["eval", str(off), "--weights", "missing.safetensors", "--device", "cpu"]) == 2
    assert "no such weights file" in capsys.readouterr().err


def test_eval_filename_names_the_weights():
    recalibrated = "model-recalibrated.safetensors"
    assert eval_filename(None, "parallel", None, weights=recalibrated) == "eval-recalibrated.json"
    assert eval_filename("serial", "parallel", 9, weights=recalibrated) == "eval-recalibrated-serial-T9.json"
    assert eval_filename(None, "parallel", None, "val", weights=recalibrated) == "eval-recalibrated-val.json"
    assert eval_filename(None, "parallel", None, weights="model.safetensors") == "eval.json"
    assert eval_filename(None, "parallel", None, weights="other.safetensors") == "eval-other.json"


def test_an_interruption_during_recalibration_resumes_to_the_same_run(tmp_path, monkeypatch):
    import cascadenet.training.loop as T

    full = train(small_cfg(tmp_path / "a", epochs=1))
    real = T.recalibrate_bn

    def interrupted(model, batches, **kw):
        def some():
            yield next(iter(batches))
            raise KeyboardInterrupt

        return real(model, some(), **kw)

    monkeypatch.setattr(T, "recalibrate_bn", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(tmp_path / "b", epochs=1))
    run = tmp_path / "b" / "run"
    assert not (run / "model.safetensors").exists() and not (run / "metrics.jsonl").exists()
    monkeypatch.setattr(T, "recalibrate_bn", real)
    resumed = train(resume=run)
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [(full / "metrics.jsonl").read_text(), (resumed / "metrics.jsonl").read_text()]
    drop = ("seconds", "train_images_per_s")
    ra, rb = ({k: v for k, v in json.loads(r).items() if k not in drop} for r in rows)
    assert ra == rb and ra["bn_recalibration"]["batches"] == 4


def test_recalibrate_batches_is_checked_and_loss_final_refuses_untrained_parameters(tmp_path, capsys):
    with pytest.raises(ValueError, match="--recalibrate-batches must be >= 0"):
        TrainConfig(recalibrate_batches=-1)
    for flags in (dict(multi_head=True), dict(temporal_affine=True)):
        with pytest.raises(ValueError, match="--loss final trains only the feed-forward network") as e:
            small_cfg(tmp_path, loss="final", **flags)
        assert "--" + next(iter(flags)).replace("_", "-") in str(e.value)
    small_cfg(tmp_path, loss="td", multi_head=True, temporal_affine=True)  # fine with the trajectory losses
    argv = ["train", "--dataset", "synthetic", "--loss", "final", "--multi-head", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--multi-head" in err[0] and "--loss final" in err[0]
    assert not any(tmp_path.iterdir())
    assert main(["recalibrate", str(tmp_path), "--batches", "0"]) == 2
    assert "--batches must be a positive integer" in capsys.readouterr().err


def test_a_run_written_before_the_option_reads_as_not_recalibrating(tmp_path):
    stored = {"train": {k: v for k, v in TrainConfig().to_dict().items() if k != "recalibrate_batches"}}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert TrainConfig.from_file(tmp_path / "config.json").recalibrate_batches == 0
    assert TrainConfig.from_dict(stored["train"]).recalibrate_batches == 4  # options given from Python: the default
