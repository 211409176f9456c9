"""LightNet and the model registry."""
from .lightnet import LightNet, Stem
from .registry import MODEL_CONFIGS, create_model, list_models, model_config

__all__ = ["LightNet", "Stem", "MODEL_CONFIGS", "create_model", "list_models", "model_config"]
