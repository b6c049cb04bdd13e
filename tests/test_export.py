"""Export: torch.export of model(x) (no cache keyed on data pointers while tracing), the step program with the step
index as a tensor (one program for every step) equal to model.step, the files `cascadenet export` writes, and
those files under ONNX Runtime; every program equals eager PyTorch within 1e-5 at every step and batch size."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cascadenet as cn
from cascadenet.cli import main
from cascadenet.deployment.export import export_program, step_path
from cascadenet.models.precise_bn import recalibrate_bn
from cascadenet.models.program import StepProgram, TrajectoryProgram
from conftest import perturb_norms, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"
TOL = 1e-5
VARIANTS = [
    {},
    {"scheme": "serial"},
    {"delay": "ews", "alpha": 0.5, "multi_head": True, "temporal_affine": True},
    {"stem_delay": False, "delay": "ews", "alpha": 0.3, "scheme": "serial", "num_steps": 9},
]


def trained_like(**options):
    """A tiny cascade with statistics as training leaves them: every slot recomputed at the weights (the step-0
    slots of input-independent states then hold variances of 0)."""
    model = tiny_model("resnet10", num_classes=4, **options)
    perturb_norms(model)
    recalibrate_bn(model, [torch.randn(16, 3, 16, 16) for _ in range(2)])
    return model.eval()


def steps_of(step_fn, model, x, state):
    """Logits of every step (two past the last slot) from a step function taking (x, t, *state)."""
    out = []
    for t in range(model.num_steps + 2):
        logits, *state = step_fn(x, torch.tensor(t), *state)
        out.append(torch.as_tensor(np.asarray(logits)) if not isinstance(logits, torch.Tensor) else logits)
    return torch.stack(out)


def eager_steps(model, x):
    state, out = None, []
    with torch.no_grad():
        for _ in range(model.num_steps + 2):
            logits, state = model.step(x, state)
            out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(o) or "default")
def test_step_program_is_model_step_at_every_step(options):
    model = trained_like(**options)
    program = StepProgram(model, (3, 16, 16)).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        got = steps_of(program, model, x, program.initial_state(x))
    assert (got - eager_steps(model, x)).abs().max() <= TOL


def test_torch_export_of_the_trajectory_and_the_step_with_a_dynamic_batch():
    model = trained_like()
    batch = torch.export.Dim("batch", min=1, max=1024)
    x = torch.randn(2, 3, 16, 16)
    # model(x) itself exports (the evaluation cache keyed on data pointers is skipped while tracing)
    exported = torch.export.export(TrajectoryProgram(model, (3, 16, 16)), (x,), dynamic_shapes=({0: batch},)).module()
    program = StepProgram(model, (3, 16, 16)).eval()
    state = program.initial_state(x)
    dynamic = ({0: batch}, None, tuple({0: batch} for _ in state))
    step = torch.export.export(program, (x, torch.tensor(0), *state), dynamic_shapes=dynamic).module()
    for b in (1, 5):
        xb = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            assert (exported(xb) - model(xb)).abs().max() <= TOL
            got = steps_of(step, model, xb, program.initial_state(xb))
        assert (got - eager_steps(model, xb)).abs().max() <= TOL


def test_cli_export_pt2_writes_both_programs_and_refuses_to_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    out = tmp_path / "model.pt2"
    assert main(["export", str(run), "-o", str(out), "--input-size", "16", "16"]) == 0
    assert "model-step.pt2" in capsys.readouterr().out
    model = cn.load_model(run)
    trajectory = torch.export.load(out).module()
    step = torch.export.load(step_path(out)).module()
    program = StepProgram(model, (3, 16, 16))
    for b in (1, 3):
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            assert (trajectory(x) - model(x)).abs().max() <= TOL
            assert (steps_of(step, model, x, program.initial_state(x)) - eager_steps(model, x)).abs().max() <= TOL
    before = out.read_bytes()
    assert main(["export", str(run), "-o", str(out), "--input-size", "16", "16"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    for argv, message in [
        (["-o", str(tmp_path / "m.txt"), "--input-size", "16", "16"], "--format onnx, pt2 or aoti"),
        (["-o", str(tmp_path / "m.pt2")], "--input-size"),  # a format-1 run does not record its input size
    ]:
        assert main(["export", str(run), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow  # AOTInductor compiles C++: ~20 s a program on a shared 2-core machine
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None, reason="needs a C++ compiler")
def test_cli_export_aoti_compiles_both_programs_with_a_dynamic_batch(tmp_path, capsys):
    from cascadenet.deployment.export import load_compiled

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    out = tmp_path / "model.pt2"
    assert main(["export", str(run), "-o", str(out), "--format", "aoti", "--input-size", "16", "16"]) == 0
    model = cn.load_model(run)
    trajectory, step = load_compiled(out), load_compiled(step_path(out))
    program = StepProgram(model, (3, 16, 16))
    for b in (1, 3, 8):  # compiled once, for every batch size
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            assert (trajectory(x) - model(x)).abs().max() <= TOL
            assert (steps_of(step, model, x, program.initial_state(x)) - eager_steps(model, x)).abs().max() <= TOL


def test_aoti_without_a_compiler_is_one_clear_error(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "model.pt2"
    assert main(["export", str(run), "-o", str(out), "--format", "aoti", "--input-size", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert "no compiler" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not step_path(out).exists()


def onnx_session(path):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_onnx_step_program_under_onnx_runtime(tmp_path):
    pytest.importorskip("onnxscript")
    model = trained_like(scheme="serial")
    path = export_program(model, tmp_path / "step.onnx", program="step", format="onnx", input_size=(3, 16, 16))
    session = onnx_session(path)
    program = StepProgram(model, (3, 16, 16))
    names = [i.name for i in session.get_inputs()]
    assert names == ["x", "t", *program.state_names]

    def run(x, t, *state):
        feed = {"x": x.numpy(), "t": t.numpy(), **{n: np.asarray(s) for n, s in zip(program.state_names, state)}}
        return session.run(None, feed)

    for b in (1, 4):
        x = torch.randn(b, 3, 16, 16)
        got = steps_of(run, model, x, program.initial_state(x))
        assert (got - eager_steps(model, x)).abs().max() <= TOL


@pytest.mark.slow  # the ONNX export of the whole trajectory takes ~20 s on a shared 2-core machine
def test_onnx_trajectory_under_onnx_runtime(tmp_path):
    pytest.importorskip("onnxscript")
    model = trained_like()
    path = export_program(model, tmp_path / "t.onnx", program="trajectory", format="onnx", input_size=(3, 16, 16))
    session = onnx_session(path)
    for b in (1, 6):
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            ref = model(x)
        assert np.abs(session.run(None, {"x": x.numpy()})[0] - ref.numpy()).max() <= TOL


def test_programs_of_a_cascaded_user_network():
    from test_network import BasicBlock, ResNet, randomized

    model = cn.cascade(randomized(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4))).eval()
    x = torch.randn(2, 3, 16, 16)
    program = StepProgram(model, (3, 16, 16)).eval()
    with torch.no_grad():
        assert (steps_of(program, model, x, program.initial_state(x)) - eager_steps(model, x)).abs().max() <= TOL
        assert (TrajectoryProgram(model, (3, 16, 16))(x) - model(x)).abs().max() <= TOL
