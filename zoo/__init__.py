"""zoo: a model zoo and benchmark harness for conditional generative models."""

from zoo.checkpoint import load, read_info, save_checkpoint
from zoo.errors import ZooError
from zoo.model import GenerativeModel, ModelConfig, Posterior
from zoo.registry import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "GenerativeModel",
    "ModelConfig",
    "Posterior",
    "ZooError",
    "create_model",
    "list_models",
    "load",
    "read_info",
    "register_model",
    "save_checkpoint",
]
