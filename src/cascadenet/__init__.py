"""cascadenet: parallel cascaded ResNets with a temporal-difference loss, for anytime prediction."""

from .cascade import CascadedResNet, CascadeState
from .registry import create_model, list_models, model_config, register_model

__all__ = [
    "CascadedResNet",
    "CascadeState",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
]

__version__ = "0.1.0"
