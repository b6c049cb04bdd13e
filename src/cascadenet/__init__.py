"""cascadenet: parallel cascaded ResNets with a temporal-difference loss, for anytime prediction."""

# Ctrl-C from the package's first line on (torch's import takes seconds): the command exits 130 quietly
# (utils/command.py, exit_if_command); a library import gets the interrupt.
try:
    import os

    # OpenMP threads that spin while they wait stall their whole team when another process takes one of its
    # cores: training on 2 cores beside one busy process ran 4x slower with the default policy and kept most of
    # its speed with sleeping waiters (benchmarks/threads.py, docs/benchmarks.md). OpenMP reads this once, when
    # torch loads it, so it is set before the first import of torch; a value the user set wins, and it changes
    # nothing if torch was imported before cascadenet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from .deployment.loading import load_model
    from .evaluation.early_exit import Predictions, predict
    from .models.anytime import AnytimeModel, ExitCosts, ModelConfig
    from .models.cascade import CascadeConfig, CascadedResNet, CascadeState
    from .models.msdnet import MSDNet, MSDNetConfig
    from .models.network import CascadedNetwork, NetworkConfig, cascade
    from .models.precise_bn import recalibrate_bn
    from .models.registry import create_model, list_models, register_architecture, register_family, register_model
    from .models.sdn import SDN, SDNConfig
    from .runs.config import TrainConfig
    from .training.fit import fit
    from .training.losses import stepwise_ce, td_loss
except KeyboardInterrupt as _interrupt:
    from .utils.command import exit_if_command  # imported here: an interrupt may have cut its own import short

    exit_if_command(_interrupt)

__all__ = [
    "AnytimeModel",
    "CascadeConfig",
    "CascadedResNet",
    "CascadeState",
    "CascadedNetwork",
    "cascade",
    "ExitCosts",
    "ModelConfig",
    "NetworkConfig",
    "MSDNet",
    "MSDNetConfig",
    "Predictions",
    "create_model",
    "fit",
    "list_models",
    "load_model",
    "predict",
    "recalibrate_bn",
    "register_architecture",
    "register_family",
    "register_model",
    "SDN",
    "SDNConfig",
    "stepwise_ce",
    "td_loss",
    "TrainConfig",
]

__version__ = "0.1.0"
