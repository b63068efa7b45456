"""Architectures (one family per module, registered by name) and LocalModel."""

from keras_local.models import mlp, vgg  # noqa: F401  (registers the families)
from keras_local.models.local_model import LocalModel, build_model
from keras_local.models.registry import build_feature_layers, list_models, register_model

__all__ = ["LocalModel", "build_model", "build_feature_layers", "list_models", "register_model"]
