"""cascadenet: parallel cascaded ResNets with a temporal-difference loss, for anytime prediction."""

from .anytime import AnytimeModel, ExitCosts, ModelConfig
from .cascade import CascadeConfig, CascadedResNet, CascadeState
from .checkpoint import load_model
from .losses import stepwise_ce, td_loss
from .registry import create_model, list_models, register_architecture, register_family, register_model

__all__ = [
    "AnytimeModel",
    "CascadeConfig",
    "CascadedResNet",
    "CascadeState",
    "ExitCosts",
    "ModelConfig",
    "create_model",
    "list_models",
    "load_model",
    "register_architecture",
    "register_family",
    "register_model",
    "stepwise_ce",
    "td_loss",
]

__version__ = "0.1.0"
