"""Architectures (one family per module, registered by name) and LocalModel.

Family modules register their names when imported and import Keras only inside their
builders, so ``list_models()`` starts no backend.
"""

from keras_local._lazy import lazy_exports
from keras_local.models.registry import build_feature_layers, list_models, register_model

_EXPORTS = {"LocalModel": "keras_local.models.local_model",
            "load_model": "keras_local.models.local_model",
            "build_model": "keras_local.run.training"}  # a model for a run: placement, scopes
__all__ = ["LocalModel", "build_model", "load_model", "build_feature_layers", "list_models",
           "register_model"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
