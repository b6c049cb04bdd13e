"""cascadenet noise: the noise protocols fed through the streaming step equal a hand-run reference; sigma 0 is the
clean trajectory; a transient stops reaching the output exactly when the finite memory of the one-step delay says;
the feed-forward and running-average baselines see the same frames; the command writes its report and never
overwrites."""

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import cascadenet as cn
from cascadenet.cli import main
from cascadenet.data.datasets import ImageSet
from cascadenet.data.loader import iterate_batches
from cascadenet.properties.noise import (
    PROTOCOLS,
    Protocol,
    ews_variant,
    noise_robustness,
    noise_trajectories,
    noisy_frames,
    standard_noise,
)
from cascadenet.runs.data import run_training_batches
from cascadenet.runs.load import load_run
from conftest import perturb_norms, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"
MEAN = torch.tensor([0.4, 0.5, 0.6])
STD = torch.tensor([0.2, 0.25, 0.3])


def images(n=6, size=8, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalise(pixels):
    return (pixels - MEAN.double().view(1, 3, 1, 1)) / STD.double().view(1, 3, 1, 1)


def hand_frames(x, sigma, protocol, num_steps, seed):
    """The frames written out from the definition: pixel noise of draw t (0 for frozen) where noisy, clipped."""
    pixels = x.double() / 255
    out = []
    for t in range(num_steps):
        noisy = {"persistent": True, "frozen": True, "transient": t < protocol.steps_noisy,
                 "burst": protocol.burst[0] <= t <= protocol.burst[1]}[protocol.name]  # fmt: skip
        z = standard_noise(seed, 0, len(x), 0 if protocol.name == "frozen" else t, x.shape[1:]).double()
        out.append(normalise((pixels + sigma * z).clamp(0, 1) if noisy else pixels))
    return out


@pytest.fixture(scope="module")
def cascade():
    torch.manual_seed(0)
    model = tiny_model("resnet10", num_classes=4).double()
    perturb_norms(model)
    return model.eval()


def protocols(k=2, burst=(3, 4)):
    return [Protocol(name, steps_noisy=k, burst=burst) for name in PROTOCOLS]


@pytest.mark.parametrize("protocol", protocols(), ids=PROTOCOLS)
def test_frames_follow_the_protocol_definition(protocol):
    x = images()
    frames = list(noisy_frames(x, MEAN, STD, 0.3, protocol, 7, seed=5, dtype=torch.float64))
    reference = hand_frames(x, 0.3, protocol, 7, seed=5)
    for f, r in zip(frames, reference, strict=True):
        torch.testing.assert_close(f, r)
    # pixel values stay in [0, 1]; clean frames are the clean image; the frozen draw is one tensor
    for f in frames:
        pixels = f * STD.double().view(1, 3, 1, 1) + MEAN.double().view(1, 3, 1, 1)
        assert pixels.min() >= -1e-12 and pixels.max() <= 1 + 1e-12
    noisy = [protocol.noisy(t) for t in range(7)]
    assert noisy == {"persistent": [True] * 7, "frozen": [True] * 7, "transient": [True] * 2 + [False] * 5,
                     "burst": [False] * 3 + [True] * 2 + [False] * 2}[protocol.name]  # fmt: skip
    for t in range(1, 7):
        same = frames[t] is frames[t - 1]
        assert same == (protocol.name == "frozen" or (not noisy[t] and not noisy[t - 1]))


def test_noise_is_seeded_and_independent_of_the_batch():
    x = images(n=150, size=4)
    protocol = Protocol("persistent")
    whole = list(noisy_frames(x, MEAN, STD, 0.2, protocol, 3, seed=1))
    again = list(noisy_frames(x, MEAN, STD, 0.2, protocol, 3, seed=1))
    other = list(noisy_frames(x, MEAN, STD, 0.2, protocol, 3, seed=2))
    for cut in (37, 64, 100):  # batch edges inside and on the 64-example blocks
        parts = [
            list(noisy_frames(x[:cut], MEAN, STD, 0.2, protocol, 3, seed=1)),
            list(noisy_frames(x[cut:], MEAN, STD, 0.2, protocol, 3, seed=1, offset=cut)),
        ]
        for t in range(3):
            assert torch.equal(torch.cat([parts[0][t], parts[1][t]]), whole[t])
    for t in range(3):
        assert torch.equal(whole[t], again[t]) and not torch.equal(whole[t], other[t])
    assert not torch.equal(whole[0], whole[1])  # a fresh draw every step
    # the noise has std sigma on the pixel scale (mid-grey images, so clipping is negligible)
    grey = torch.full((200, 3, 8, 8), 128, dtype=torch.uint8)
    frame = next(noisy_frames(grey, MEAN, STD, 0.1, protocol, 1, seed=0, dtype=torch.float64))
    noise = frame * STD.double().view(1, 3, 1, 1) + MEAN.double().view(1, 3, 1, 1) - 128 / 255
    assert abs(float(noise.std()) - 0.1) < 0.002 and abs(float(noise.mean())) < 0.002


def test_sigma_zero_is_the_clean_trajectory(cascade):
    x = images()
    clean = normalise(x.double() / 255)
    # the clean frames are the evaluation's normalised batches
    labels = torch.zeros(len(x), dtype=torch.int64)
    loader = next(iterate_batches(ImageSet(x, labels, ["a"], "synthetic", False), len(x), shuffle=False,
                                  augment=False, mean=MEAN, std=STD))[0]  # fmt: skip
    torch.testing.assert_close(next(noisy_frames(x, MEAN, STD, 0.0, Protocol("persistent"), 1)), loader)
    for protocol in protocols():
        traj = noise_trajectories(cascade, x, MEAN, STD, 0.0, protocol, 8)
        with torch.no_grad():
            torch.testing.assert_close(traj["cascade"], cascade(clean, num_steps=8).float(), rtol=0, atol=1e-5)
            ff = cascade.feedforward(clean).float()
        for key in ("feedforward", "feedforward-average"):
            torch.testing.assert_close(traj[key], ff.expand(8, -1, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("protocol", protocols(), ids=PROTOCOLS)
def test_every_method_sees_the_same_frames_as_a_hand_run(cascade, protocol):
    """The cascade, its EWS variant, the feed-forward net and the running average, each run by hand on the frames
    of the definition: the protocol's logits equal them, so all methods saw those frames."""
    x, steps, sigma = images(), 7, 0.4
    variants = {"ews-0.5": ews_variant(cascade, 0.5)}
    traj = noise_trajectories(cascade, x, MEAN, STD, sigma, protocol, steps, variants=variants, seed=9)
    frames = hand_frames(x, sigma, protocol, steps, seed=9)
    ews = dataclasses.replace(cascade.config, delay="ews", alpha=0.5).build().double()
    ews.load_state_dict(cascade.state_dict())
    ews.eval()
    expected = {name: [] for name in traj}
    state = ews_state = None
    with torch.no_grad():
        for t, frame in enumerate(frames):
            logits, state = cascade.step(frame, state)
            expected["cascade"].append(logits)
            logits, ews_state = ews.step(frame, ews_state)
            expected["ews-0.5"].append(logits)
            expected["feedforward"].append(cascade.feedforward(frame))
            expected["feedforward-average"].append(cascade.feedforward(torch.stack(frames[: t + 1]).mean(0)))
    assert set(traj) == {"cascade", "ews-0.5", "feedforward", "feedforward-average"}
    for name, logits in expected.items():
        torch.testing.assert_close(traj[name], torch.stack(logits).float(), rtol=0, atol=1e-5, msg=name)
    # the EWS variant integrates: it differs from the cascade
    assert not torch.allclose(traj["ews-0.5"], traj["cascade"], atol=1e-3)


@pytest.mark.parametrize(("stem_delay", "scheme"), [(True, "parallel"), (False, "parallel"), (True, "serial")])
def test_a_transient_clears_exactly_when_the_memory_ends(stem_delay, scheme):
    """With the one-step delay the output at step t depends only on the last D + 1 frames (stem delayed: up to
    t - 1): after the noise ends at step e it equals the clean trajectory from step e + settle_steps on, and not
    one step earlier; before a burst starts it is the clean trajectory too."""
    torch.manual_seed(1)
    model = tiny_model("resnet10", num_classes=4, stem_delay=stem_delay, scheme=scheme).double()
    perturb_norms(model)
    model.eval()
    settle, x, steps = model.settle_steps, images(), 16
    with torch.no_grad():
        clean = model(normalise(x.double() / 255), num_steps=steps).float()
    for protocol in (Protocol("transient", steps_noisy=3), Protocol("burst", burst=(4, 5))):
        traj = noise_trajectories(model, x, MEAN, STD, 0.5, protocol, steps)["cascade"]
        clears = protocol.last_noisy + settle
        torch.testing.assert_close(traj[clears:], clean[clears:], rtol=0, atol=1e-5)
        assert (traj[clears - 1] - clean[clears - 1]).abs().max() > 1e-4
        if protocol.name == "burst":  # the output at step t sees frame t only without the stem delay
            first_noisy_output = protocol.burst[0] + int(stem_delay)
            torch.testing.assert_close(traj[:first_noisy_output], clean[:first_noisy_output], rtol=0, atol=1e-5)
            assert (traj[first_noisy_output] - clean[first_noisy_output]).abs().max() > 1e-4


def synthetic(n=20, size=8):
    g = torch.Generator().manual_seed(3)
    return ImageSet(images(n, size, seed=4), torch.randint(0, 4, (n,), generator=g), list("abcd"), "synthetic", False)


def ews_run(model, x, steps):
    state, out = None, []
    for _ in range(steps):
        logits, state = model.step(x, state)
        out.append(logits)
    return torch.stack(out)


def test_ews_variant_with_more_steps_repeats_the_last_slot():
    """Lengthening the EWS variant gives every step a slot of its own, filled from the last one: the same
    answers as the short variant, which uses its last slot past its end (per-step affine and heads too)."""
    torch.manual_seed(0)
    model = tiny_model("resnet10", num_classes=4, temporal_affine=True, multi_head=True).double()
    perturb_norms(model)
    with torch.no_grad():
        for head in model.heads:
            head.weight.add_(torch.randn_like(head.weight))  # heads that differ per step
    x = normalise(images().double())
    T = model.num_steps
    short, long = ews_variant(model, 0.5), ews_variant(model, 0.5, num_steps=T + 5)
    assert long.num_steps == T + 5 and len(long.heads) == T + 5
    bn = long.norms()[3]
    assert bn.running_mean.shape[0] == T + 5 and torch.equal(bn.running_mean[T:], bn.running_mean[T - 1].expand(5, -1))
    torch.testing.assert_close(ews_run(long, x, T + 5), ews_run(short, x, T + 5), rtol=0, atol=0)
    same = ews_variant(model, 0.5).state_dict()  # as many steps as the model: its very tensors
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())


def test_ews_variant_calibration_gives_it_its_own_statistics():
    """With calibration batches, evaluation-mode EWS normalises each step as batch statistics of its own
    trajectory do (here: one batch, the one evaluated; the unbiased variance of the running statistics is the only
    difference); with the trained statistics it does not. Without the stem delay every state depends on the
    input: the input-independent states of a delayed stem amplify even that difference by up to 1/sqrt(eps)."""
    torch.manual_seed(0)
    model = tiny_model("resnet10", num_classes=4, stem_delay=False).double()
    perturb_norms(model)
    model.eval()
    x = normalise(images(n=64, size=16, seed=3).double())
    steps = model.num_steps + 6
    plain = ews_variant(model, 0.7, num_steps=steps)
    own = ews_variant(model, 0.7, num_steps=steps, calibration=[x])
    reference = copy.deepcopy(own).train()  # batch statistics: the trajectory's own by definition
    with torch.no_grad():
        target = reference(x)
        got, before = own(x), plain(x)
    assert not own.training and not plain.training
    scale = target.abs().max().item()
    torch.testing.assert_close(got, target, rtol=0, atol=0.01 * scale)
    assert (before - target).abs().amax(dim=(1, 2)).min() > scale  # at every step
    # the model's own statistics are untouched
    assert torch.equal(model.norms()[0].running_mean, ews_variant(model, 0.7).norms()[0].running_mean)


def test_noise_robustness_counts_what_the_trajectories_predict(cascade):
    ds = synthetic()
    options = dict(sigmas=(0.0, 0.3), protocols=("persistent", "transient"), alphas=(0.5,), num_steps=9,
                   steps_noisy=2, seed=4)  # fmt: skip
    result = noise_robustness(cascade, ds, MEAN, STD, batch_size=7, **options)
    assert result == noise_robustness(cascade, ds, MEAN, STD, batch_size=100, **options)  # batch-independent
    assert result["methods"].keys() == {"cascade", "ews-0.5", "feedforward", "feedforward-average"}
    clean = noise_trajectories(cascade, ds.images, MEAN, STD, 0.0, Protocol("persistent"), 9,
                               variants={"ews-0.5": ews_variant(cascade, 0.5)})  # fmt: skip
    for name, entry in result["clean"].items():
        acc = (clean[name].argmax(-1) == ds.labels).double().mean(1)
        assert entry["accuracy_per_step"] == pytest.approx(acc.tolist())
        assert entry["final_accuracy"] == pytest.approx(float(acc[-1]))
        assert entry["mean_accuracy"] == pytest.approx(float(acc.mean()))
    transient = Protocol("transient", steps_noisy=2)
    noisy = noise_trajectories(cascade, ds.images, MEAN, STD, 0.3, transient, 9,
                               variants={"ews-0.5": ews_variant(cascade, 0.5)}, seed=4)  # fmt: skip
    zero, entry = result["results"]["transient"]
    assert zero["sigma"] == 0.0 and entry["sigma"] == 0.3
    for name in result["methods"]:
        assert zero["methods"][name]["accuracy_per_step"] == result["clean"][name]["accuracy_per_step"]
        assert zero["methods"][name]["agreement_per_step"] == [1.0] * 9
        pred = noisy[name].argmax(-1)
        got = entry["methods"][name]
        assert got["accuracy_per_step"] == pytest.approx((pred == ds.labels).double().mean(1).tolist())
        agree = (pred == clean[name].argmax(-1)).double().mean(1)
        assert got["agreement_per_step"] == pytest.approx(agree.tolist())
        later = [t for t in range(2, 9) if all(agree[u] >= 0.99 for u in range(t, 9))]
        assert got["recovery_step"] == (later[0] if later else None)
    info = result["protocols"]["transient"]
    assert info["noisy_steps"] == [0, 1] and info["cascade_clears_at_step"] == 1 + cascade.settle_steps
    cascade_entry = entry["methods"]["cascade"]
    assert cascade_entry["agreement_per_step"][info["cascade_clears_at_step"] :] == [1.0] * 2
    assert entry["methods"]["feedforward"]["recovery_step"] == 2  # the first clean frame
    assert "recovery_step" not in result["results"]["persistent"][1]["methods"]["cascade"]


def test_subsets_defaults_and_bad_options(cascade):
    ds = synthetic()
    sub = noise_robustness(cascade, ds, MEAN, STD, sigmas=(0.2,), protocols=("frozen",), alphas=(), max_examples=9)
    assert sub["num_examples"] == 9 and set(sub["methods"]) == {"cascade", "feedforward", "feedforward-average"}
    assert sub == noise_robustness(cascade, ds, MEAN, STD, sigmas=(0.2,), protocols=("frozen",), alphas=(),
                                   max_examples=9)  # fmt: skip
    # defaults: K = half the settling time, the burst after the ordinary trajectory, long enough to clear
    d = noise_robustness(cascade, ds, MEAN, STD, sigmas=(0.2,), alphas=(), max_examples=2)
    settle, own = cascade.settle_steps, cascade.num_steps
    assert d["steps_noisy"] == settle // 2 and d["burst"] == [own, own + settle // 2 - 1]
    assert d["num_steps"] == own + settle // 2 + settle
    assert d["protocols"]["burst"]["cascade_clears_at_step"] == d["num_steps"] - 1
    for options, message in [
        ({"sigmas": (-0.1,)}, "--sigmas"),
        ({"sigmas": (0.1, 0.1)}, "given twice"),
        ({"sigmas": ()}, "--sigmas needs"),
        ({"protocols": ("gaussian",)}, "unknown protocol"),
        ({"alphas": (1.0,)}, "--alphas"),
        ({"steps_noisy": 0}, "--steps-noisy"),
        ({"steps_noisy": 5, "num_steps": 5}, "below --num-steps"),
        ({"burst": (4, 2)}, "--burst"),
        ({"burst": (2, 9), "num_steps": 9}, "--burst 2 9"),
        ({"max_examples": 0}, "--max-examples"),
        ({"seed": -1}, "--seed"),
    ]:
        with pytest.raises(ValueError, match=message):
            noise_robustness(cascade, ds, MEAN, STD, **options)


@pytest.mark.parametrize("name", ["sdn-resnet10", "msdnet-cifar"])
def test_families_without_a_streaming_step_are_refused(name):
    model = cn.create_model(name, num_classes=4)
    with pytest.raises(ValueError, match=r"needs a cascade.*model\.step"):
        noise_robustness(model, synthetic(), MEAN, STD)


def test_cli_writes_the_report_and_never_overwrites(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    folder = tmp_path / "a" / "b"  # made when missing
    argv = ["noise", str(run), "--protocols", "frozen", "transient", "--sigmas", "0.3", "--alphas", "0.5",
            "--max-examples", "6", "--num-steps", "9", "--device", "cpu", "--out", str(folder),
            "--ews-recalibrate-batches", "2"]  # fmt: skip
    assert main(argv) == 0
    screen = capsys.readouterr().out
    assert "wrote" in screen and str(folder) in screen and "transient, sigma 0.3" in screen
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(files) == {"noise.md", "noise.json", "noise-steps.png", "noise-final.png"}
    assert all(files[n].startswith(b"\x89PNG") for n in ("noise-steps.png", "noise-final.png"))
    result = json.loads(files["noise.json"])
    assert result["run"] == "run" and result["split"] == "test" and result["num_examples"] == 6
    assert list(result["results"]) == ["frozen", "transient"] and result["sigmas"] == [0.3]
    assert result["num_steps"] == 9 and result["alphas"] == [0.5]
    assert result["ews_statistics"] == "own" and result["ews_recalibrate_batches"] == 2
    report = files["noise.md"].decode()
    assert "## transient: final accuracy" in report and "ews-0.5" in report and "noise-steps.png" in report
    # the same numbers as the library on the loaded run
    loaded = load_run(run, device="cpu")
    calibration = run_training_batches(run, 2)
    again = noise_robustness(loaded.model, loaded.data, loaded.mean, loaded.std, sigmas=(0.3,), alphas=(0.5,),
                             protocols=("frozen", "transient"), max_examples=6, num_steps=9,
                             ews_calibration=calibration)  # fmt: skip
    assert result["results"] == json.loads(json.dumps(again["results"]))
    # never over a file without --overwrite, one line; with it, replaced
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    cheap = ["--protocols", "frozen", "--alphas", "--max-examples", "4", "--num-steps", "7", "--out", str(folder)]
    assert main([*argv[:2], *cheap, "--overwrite"]) == 0
    other = json.loads((folder / "noise.json").read_text())
    assert other["alphas"] == [] and other["num_steps"] == 7 and list(other["results"]) == ["frozen"]
    capsys.readouterr()


@pytest.mark.slow
def test_cli_defaults_every_protocol_into_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    assert main(["noise", str(run), "--max-examples", "16", "--device", "cpu"]) == 0
    result = json.loads((run / "noise" / "noise.json").read_text())
    assert list(result["results"]) == list(PROTOCOLS) and result["sigmas"] == [0.1, 0.2, 0.4]
    assert result["alphas"] == [0.9] and result["num_steps"] == 15  # 6 own steps; the burst 6..8 clears at 14
    loaded = load_run(run, device="cpu")
    again = noise_robustness(loaded.model, loaded.data, loaded.mean, loaded.std, max_examples=16,
                             ews_calibration=run_training_batches(run, 4))  # fmt: skip
    assert result["results"] == json.loads(json.dumps(again["results"]))


def test_cli_bad_options_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    for argv, message in [
        (["--sigmas", "-1"], "--sigmas"),
        (["--burst", "5", "3"], "--burst"),
        (["--protocols", "frozen", "frozen"], "given twice"),
        (["--steps-noisy", "9", "--num-steps", "4"], "below --num-steps"),
        (["--alphas", "1.5"], "--alphas"),
        (["--out", str(run / "config.json")], "not a folder"),
    ]:
        assert main(["noise", str(run), "--max-examples", "4", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "noise").exists()
    assert main(["noise", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_recovery_is_the_first_step_after_the_noise_from_which_agreement_stays_high():
    from cascadenet.properties.noise import _recovery

    agree = torch.tensor
    assert _recovery(agree([1.0, 1.0, 0.5, 1.0, 0.995]), 1) == 3
    assert _recovery(agree([1.0, 1.0, 1.0, 1.0]), 1) == 2  # never at or before the last noisy step
    assert _recovery(agree([1.0, 1.0, 1.0, 0.98]), 0) is None
    assert _recovery(agree([1.0, 1.0]), 1) is None  # the noise lasts to the end
