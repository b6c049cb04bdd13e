"""Train, evaluate and plot rely on the anytime-model interface only: a model family written here, a three-exit MLP
that shares nothing with cascaded ResNets, goes through all of them."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cascadenet as cn
from cascadenet.evaluation.evaluate import evaluate, format_table
from cascadenet.evaluation.plotting import plot_runs
from cascadenet.models.anytime import positive_int
from cascadenet.models.checkpoint import load_model
from cascadenet.training.loop import TrainConfig, train


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExitMLPConfig(cn.ModelConfig):
    family = "test-exit-mlp"

    hidden: int = 32
    """Units of each hidden layer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("hidden", self.hidden)

    def build(self) -> "ExitMLP":
        return ExitMLP(self)


class ExitMLP(nn.Module):
    """Three hidden layers on the image resized to 16x16, a classifier after each: exits 0, 1, 2."""

    first_informative_exit = 0

    def __init__(self, config: ExitMLPConfig) -> None:
        super().__init__()
        self.config = config
        d = config.in_channels * 16 * 16
        self.layers = nn.ModuleList([nn.Linear(d if i == 0 else config.hidden, config.hidden) for i in range(3)])
        self.exits = nn.ModuleList([nn.Linear(config.hidden, config.num_classes) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(x, 16).flatten(1)
        out = []
        for layer, head in zip(self.layers, self.exits):
            h = F.relu(layer(h))
            out.append(head(h))
        return torch.stack(out)  # (E, B, C)

    def exit_costs(self, input_size):
        macs, cumulative = 0, []
        for layer, head in zip(self.layers, self.exits):
            macs += layer.in_features * layer.out_features
            cumulative.append(macs + head.in_features * head.out_features)
        return cn.ExitCosts(cumulative, [1.0, 2.0, 3.0])


cn.register_model("test-exit-mlp", ExitMLPConfig, hidden=32)


def test_the_protocol_is_satisfied():
    model = cn.create_model("test-exit-mlp", num_classes=4)
    assert isinstance(model, cn.AnytimeModel)
    assert isinstance(cn.create_model("resnet10", width=4), cn.AnytimeModel)
    assert not isinstance(nn.Linear(2, 2), cn.AnytimeModel)


@pytest.mark.parametrize("loss", ["td", "final"])
def test_train_eval_plot_a_model_of_another_family(tmp_path, loss):
    cfg = TrainConfig(model=ExitMLPConfig(hidden=32), dataset="synthetic", synthetic_size=256, epochs=3,
                      batch_size=32, lr=0.05, out=str(tmp_path), name=f"mlp-{loss}", loss=loss)  # fmt: skip
    run = train(cfg)
    model = load_model(run)
    assert isinstance(model, ExitMLP) and model.config == ExitMLPConfig(hidden=32, num_classes=4, in_channels=3)
    assert TrainConfig.from_file(run / "config.json").model == model.config

    result = evaluate(run)
    saved = json.loads((run / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert result["num_steps"] == 3 and len(result["accuracy_per_step"]) == 3
    assert result["macs_per_step"] == model.exit_costs((3, 16, 16)).macs
    assert result["parallel_latency_blocks"] == [1.0, 2.0, 3.0]
    assert result["feedforward_accuracy"] is None and result["macs_feedforward"] is None and result["scheme"] is None
    assert result["policy_first_step"] == 0 and result["model"]["family"] == "test-exit-mlp"
    # the evaluation scores the saved model's own exits
    assert result["accuracy_per_step"][-1] > 0.4  # 4 classes, chance 0.25
    assert "anytime AUC" in format_table(result)
    # a cascade-only option is refused in one clear line, not a traceback
    with pytest.raises(ValueError, match="takes no scheme"):
        evaluate(run, scheme="serial")

    figure = plot_runs([(run.name, result)], tmp_path / "mlp.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unregistered_family_cannot_be_rebuilt(tmp_path):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Orphan(cn.ModelConfig):
        family = "test-orphan"

    with pytest.raises(ValueError, match="unknown model family 'test-orphan'"):
        cn.models.registry.config_from_dict(Orphan().to_dict())
