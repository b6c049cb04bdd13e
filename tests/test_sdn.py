"""Shallow-Deep Networks: the hand count of docs/baselines.md, the IC head, the placement rule, the SDN losses, the
IC-only mode, and SDN runs through train, evaluate and the command line."""

import dataclasses
import json
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import cascadenet as cn
import cascadenet.training.loop as T
from cascadenet.cli import main, model_flags
from cascadenet.evaluation.evaluate import evaluate
from cascadenet.models import registry
from cascadenet.models.checkpoint import load_model, save_weights
from cascadenet.models.registry import config_from_dict, model_name
from cascadenet.models.sdn import SDN, InternalClassifier, SDNConfig, place_ics
from cascadenet.training.loop import TrainConfig, train
from cascadenet.training.losses import ic_only_loss, sdn_loss, sdn_weights
from cascadenet.training.optim import compute_loss

# docs/baselines.md, "Hand count": sdn-resnet10, width 4, 10 classes, one 28x28 channel, ICs after blocks 1 and 3
HAND = SDNConfig(arch="resnet10", width=4, num_classes=10, in_channels=1, input_size=28, ic_after=(1, 3))
STEM, B1, B2, B3, B4, HEAD = 28224, 225792, 175616, 175616, 229376, 320
IC1, IC2 = 640, 7840


def test_exit_costs_are_the_hand_count_of_the_docs():
    model = SDN(HAND)
    costs = model.exit_costs((1, 28, 28))
    assert costs.macs == [STEM + B1 + IC1, STEM + B1 + B2 + B3 + IC1 + IC2, STEM + B1 + B2 + B3 + B4 + IC1 + IC2 + HEAD]
    assert costs.macs == [254656, 613728, 843424]  # the totals written in the docs
    assert costs.latency == [2.0, 4.0, 5.0]  # stem 1 unit, each block 1, heads 0
    assert model.feedforward_macs((1, 28, 28)) == STEM + B1 + B2 + B3 + B4 + HEAD == 834944
    assert model.ic_fractions == (254656 / 843424, 613728 / 843424)
    with pytest.raises(ValueError, match="sized for 1x28x28 inputs, got 1x32x32"):
        model.exit_costs((1, 32, 32))


def test_an_ic_after_the_stem_is_an_exit_one_unit_deep():
    # ic_after 0: an internal classifier on the stem's output (after its ReLU), 4 channels of 28x28, kernel 7
    model = SDN(SDNConfig(arch="resnet10", width=4, num_classes=10, in_channels=1, input_size=28, ic_after=(0, 1, 3)))
    costs = model.exit_costs((1, 28, 28))
    IC0 = 4 * 4 * 4 * 10  # pooled to 4x4, 4 channels, 10 classes
    assert costs.macs == [STEM + IC0, STEM + B1 + IC0 + IC1, STEM + B1 + B2 + B3 + IC0 + IC1 + IC2,
                          STEM + B1 + B2 + B3 + B4 + IC0 + IC1 + IC2 + HEAD]  # fmt: skip
    assert costs.latency == [1.0, 2.0, 4.0, 5.0]
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    seen = []
    model.ics[0].register_forward_hook(lambda m, inputs, output: seen.append(inputs[0]))
    out = model(x)
    assert out.shape == (4, 2, 10) and torch.equal(seen[0], model.stem(x, None))
    assert torch.equal(model.feedforward(x), out[-1])
    # the default placement never puts an IC on the stem
    assert 0 not in cn.create_model("sdn-resnet10", width=4).ic_after


def test_forward_shapes_exits_and_the_ic_input():
    model = SDN(HAND).eval()
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert out.shape == (3, 3, 10) and model.first_informative_exit == 0 and model.num_exits == 3
    assert [ic.kernel for ic in model.ics] == [7, 1] and [ic.linear.in_features for ic in model.ics] == [64, 784]
    assert torch.equal(model.feedforward(x), out[-1])  # the final exit is the plain ResNet's head
    seen = []
    model.ics[0].register_forward_hook(lambda m, inputs, output: seen.append(inputs[0]))
    model(x)
    assert seen[0].min() < 0  # the residual sum before the block's ReLU, as the reference code
    with pytest.raises(ValueError, match="sized for 28x28 inputs, got 32x32"):
        model(torch.randn(1, 1, 32, 32))


def test_ic_head_mixes_max_and_average_pooling():
    ic = InternalClassifier(1, 8, 16)  # an 8x8 map: kernel 2, pooled to 4x4, read out through an identity Linear
    with torch.no_grad():
        ic.linear.weight.copy_(torch.eye(16))
        ic.linear.bias.zero_()
    x = torch.arange(64.0).view(1, 1, 8, 8)  # x[r, c] = 8 r + c
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    window_max = (16 * i + 2 * j + 9).flatten()  # bottom-right of window (i, j): 8 (2i + 1) + 2j + 1
    window_mean = (16 * i + 2 * j + 4.5).flatten()  # mean of 16i + 2j + {0, 1, 8, 9}
    with torch.no_grad():
        ic.alpha.fill_(1.0)
        assert torch.equal(ic(x)[0], window_max)
        ic.alpha.fill_(0.0)
        assert torch.equal(ic(x)[0], window_mean)
        ic.alpha.fill_(0.25)
        assert torch.allclose(ic(x)[0], 0.25 * window_max + 0.75 * window_mean)
    small = InternalClassifier(2, 3, 5)  # under 4 px: no pooling, no alpha
    assert small.alpha is None and small.linear.in_features == 2 * 9
    alphas = [InternalClassifier(1, 8, 2).alpha.item() for _ in range(50)]
    assert all(0 <= a < 1 for a in alphas) and len(set(alphas)) == 50  # U[0, 1), one per IC


def test_default_placement_is_nearest_to_the_cost_fractions():
    # cumulative costs 10, 20, 50, 90 of blocks 1..4, last block 100, total 100: 15 ties between blocks 1 and 2
    # (the earlier wins), 30 -> 2, 45 and 60 -> 3, 75 and 90 -> 4; block 5 (the last) is never chosen
    assert place_ics([10, 20, 50, 90, 100], 100) == (1, 2, 3, 4)
    assert place_ics([10, 100], 100) == (1,) and place_ics([100], 100) == ()
    model = cn.create_model("sdn-resnet18", width=4, num_classes=10)
    assert model.ic_after == (1, 2, 3, 5, 6, 7) and model.config.ic_after is None  # 32x32, 8 blocks
    assert cn.create_model("sdn-resnet10", width=4).ic_after == (1, 2, 3)
    # docs/baselines.md: the placement depends on the width and the stem
    placed = {(w, stem): cn.create_model("sdn-resnet18", width=w, stem=stem).ic_after
              for w, stem in ((8, "cifar"), (16, "cifar"), (64, "cifar"), (8, "cifar_pool"))}  # fmt: skip
    assert placed == {(8, "cifar"): (1, 2, 3, 5, 6, 7), (16, "cifar"): (1, 2, 3, 5, 6, 7),
                      (64, "cifar"): (1, 2, 4, 5, 6, 7), (8, "cifar_pool"): (1, 2, 3, 4, 6, 7)}  # fmt: skip


def test_config_validation_and_stored_form(tmp_path):
    for bad in [(-1,), (4,), (2, 1), (1, 1), (1.5,)]:
        with pytest.raises(ValueError, match="ic_after must list increasing residual blocks in 0..3"):
            SDNConfig(arch="resnet10", ic_after=bad)
    with pytest.raises(ValueError, match="unknown model 'resnet11'"):
        SDNConfig(arch="resnet11")
    stored = json.loads(json.dumps(HAND.to_dict()))
    assert stored["family"] == "sdn" and stored["ic_after"] == [1, 3]
    assert config_from_dict(stored) == HAND and model_name(HAND) == "sdn-resnet10"
    model = SDN(HAND)
    save_weights(tmp_path / "m.safetensors", model)
    loaded = load_model(tmp_path / "m.safetensors")
    assert isinstance(loaded, SDN) and loaded.config == HAND
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_sdn_weights_ramp_to_the_cost_fractions():
    taus, E = (0.15, 0.9), 10
    ramp = [sdn_weights(taus, e, E) for e in range(1, E + 1)]
    assert ramp[0] == pytest.approx([0.01 + 0.015, 0.01 + 0.09])
    for e, weights in enumerate(ramp, start=1):
        assert weights == pytest.approx([min(tau, 0.01 + e * tau / E) for tau in taus])
    assert ramp[8] == pytest.approx([0.145, 0.82]) and ramp[9] == pytest.approx([0.15, 0.9])  # capped at tau
    assert all(a <= b for w0, w1 in zip(ramp, ramp[1:]) for a, b in zip(w0, w1))
    with pytest.raises(ValueError, match="epoch must be in"):
        sdn_weights(taus, 0, E)


def test_sdn_losses_are_the_formulas():
    logits, y = torch.randn(3, 5, 4), torch.randint(0, 4, (5,))
    ce = [F.cross_entropy(logits[i], y) for i in range(3)]
    assert torch.allclose(sdn_loss(logits, y, [0.2, 0.7]), 0.2 * ce[0] + 0.7 * ce[1] + ce[2])
    assert torch.allclose(ic_only_loss(logits, y), ce[0] + ce[1])
    with pytest.raises(ValueError, match="2 internal classifiers but 1 weights"):
        sdn_loss(logits, y, [0.2])
    # compute_loss weights the ICs by the model's cost fractions at the given epoch
    model = SDN(HAND).eval()
    x, y = torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,))
    out = model(x)
    w = [min(t, 0.01 + 3 * t / 5) for t in model.ic_fractions]
    cfg = TrainConfig(model=HAND, loss="sdn", epochs=5)
    expected = w[0] * F.cross_entropy(out[0], y) + w[1] * F.cross_entropy(out[1], y) + F.cross_entropy(out[2], y)
    assert torch.allclose(compute_loss(model, x, y, cfg, 3), expected)


def test_sdn_losses_need_an_sdn():
    with pytest.raises(ValueError, match="--loss sdn trains the internal classifiers.*model resnet18"):
        TrainConfig(loss="sdn")
    with pytest.raises(ValueError, match="--loss ic-only .* has none"):
        TrainConfig(model=SDNConfig(ic_after=()), loss="ic-only")
    TrainConfig(model=SDNConfig(ic_after=()), loss="sdn")  # no IC: the final head alone, allowed
    with pytest.raises(ValueError, match="no internal classifiers"):
        SDN(SDNConfig(ic_after=(), width=4)).freeze_backbone()


def tiny(tmp_path, name, **kw):
    base = dict(model=SDNConfig(arch="resnet10", width=4), dataset="synthetic", synthetic_size=80, epochs=1,
                batch_size=16, max_batches=2, warmup_epochs=0, out=str(tmp_path), name=name)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_train_final_then_ic_only_keeps_the_backbone_bit_identical(tmp_path):
    first = train(tiny(tmp_path, "final", loss="final"))
    before = load_file(str(first / "model.safetensors"))
    run = train(tiny(tmp_path, "ic", loss="ic-only", init=str(first / "model.safetensors"), lr=0.5))
    after = load_file(str(run / "model.safetensors"))
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.startswith("ics.")]
    assert any("running_mean" in k for k in frozen) and "head.weight" in frozen
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # weights and batch-norm statistics
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith("ics.") and "linear" in k)
    # under model.train() the frozen backbone's batch norms stay in evaluation mode
    model = load_model(run)
    model.freeze_backbone()
    model.train()
    assert all(not m.training for m in model.blocks.modules()) and model.ics.training
    assert all(not p.requires_grad for p in model.blocks.parameters()) and model.ics[0].linear.weight.requires_grad
    # the model file of a cascade cannot be trained IC-only; nothing is left behind
    cascade = cn.create_model("resnet10", width=4, num_classes=4)
    save_weights(tmp_path / "cascade.safetensors", cascade)
    with pytest.raises(ValueError, match="--loss ic-only trains the internal classifiers"):
        train(
            tiny(tmp_path, "bad", model=cn.CascadeConfig(), loss="ic-only", init=str(tmp_path / "cascade.safetensors"))
        )
    assert not (tmp_path / "bad").exists()


def test_train_evaluate_round_trip(tmp_path):
    run = train(tiny(tmp_path, "run", loss="sdn"))
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["family"] == "sdn" and config["model"]["input_size"] == 16  # from the data
    result = evaluate(run)
    model = load_model(run)
    assert len(result["accuracy_per_step"]) == model.num_exits == len(model.ic_after) + 1
    assert result["macs_per_step"] == model.exit_costs((3, 16, 16)).macs
    assert result["parallel_latency_blocks"] == [k + 1.0 for k in model.ic_after] + [5.0]
    assert result["feedforward_accuracy"] == pytest.approx(result["accuracy_per_step"][-1])
    with pytest.raises(ValueError, match="takes no scheme"):
        evaluate(run, scheme="serial")


def test_sdn_loss_resumes_exactly(tmp_path, monkeypatch):
    """The IC weights depend on the epoch: a run interrupted in its second epoch resumes to the same weights."""
    full = train(tiny(tmp_path / "a", "run", loss="sdn", epochs=2, lr=0.05))
    real, calls = T.compute_loss, [0]

    def interrupt(*args):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(T, "compute_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "b", "run", loss="sdn", epochs=2, lr=0.05))
    monkeypatch.undo()
    resumed = train(resume=tmp_path / "b" / "run")
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_an_sdn_and_refuses_flags_of_other_families(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["train", "--model", "sdn-resnet10", "--width", "4", "--ic-after", "1", "3", "--dataset", "synthetic",
            "--synthetic-size", "64", "--epochs", "1", "--batch-size", "16", "--max-batches", "2",
            "--warmup-epochs", "0"]  # fmt: skip
    assert main([*base, "--scheme", "serial"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--scheme: not an option of the sdn family (--model sdn-resnet10)" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()
    assert main([*base, "--loss", "sdn"]) == 0
    run = tmp_path / "runs" / "sdn-resnet10-sdn-synthetic-s0"
    cfg = TrainConfig.from_file(run / "config.json")
    assert cfg.model == SDNConfig(arch="resnet10", width=4, ic_after=(1, 3), num_classes=4, input_size=16)
    options = cfg.options()
    assert options["model"] == "sdn-resnet10" and "arch" not in options and options["ic_after"] == (1, 3)
    # resuming with the same flags is no change; another model is
    assert main(["train", "--resume", str(run), "--model", "sdn-resnet10", "--ic-after", "1", "3"]) == 0
    assert main(["train", "--resume", str(run), "--model", "sdn-resnet18"]) == 2
    assert "--model cannot change" in capsys.readouterr().err
    # the IC-only recipe from the command line: --init a finished run, naming its model (consistent: accepted)
    ic_only = ["--init", str(run / "model.safetensors"), "--loss", "ic-only", "--name", "ic"]
    assert main([*base, *ic_only]) == 0
    contradicting = ["train", "--model", "sdn-resnet10", "--width", "8", "--dataset", "synthetic", *ic_only[:-1], "x"]
    assert main(contradicting) == 2
    assert "width 8 vs 4 in the file" in capsys.readouterr().err
    # a cascade flag given with a cascade stays valid, an SDN flag with a cascade is refused
    assert main(["train", "--model", "resnet10", "--ic-after", "1"]) == 2
    assert "--ic-after: not an option of the cascaded-resnet family" in capsys.readouterr().err


def test_model_flags_are_the_fields_of_every_family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))  # the test family leaves with the test

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class OtherConfig(cn.ModelConfig):
        family = "test-flags-other"

        stem: Literal["cifar", "patch"] = "patch"
        """Stem."""
        width: int = 16
        """Width."""
        growth: int = 6
        """Channels each layer adds."""

    cn.register_family(OtherConfig)  # after cli's import: its flags appear when they are collected again
    flags = model_flags._collect_flags()
    assert flags["stem"].kind == Literal["cifar", "cifar_pool", "imagenet", "patch"]  # one flag, choices merged
    assert flags["width"].families == {"cascaded-resnet": 64, "sdn": 64, "msdnet": 1.0, "test-flags-other": 16}
    assert flags["growth"].doc == "Channels each layer adds." and flags["growth"].families == {"test-flags-other": 6}
    assert flags["ic_after"].families == {"sdn": None} and "arch" not in flags and "input_size" not in flags


def test_the_test_family_did_not_leak():
    assert "test-flags-other" not in {c.family for c in registry.registered_families()}
