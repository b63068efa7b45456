"""The registry of named architectures: one name -> a builder of a model's feature layers.

A builder turns ``(input_shape, num_classes, config)`` into the ordered feature layers
of a LocalModel: LocalBlocks and parameter-free layers (max-pool, flatten). Families
register their names in their own module (``mlp.py``, ``vgg.py``, listed in
``FAMILIES``), imported on the first look-up.
"""

import importlib

FAMILIES = ("keras_local.models.mlp", "keras_local.models.vgg", "keras_local.models.resnet")
MODELS = {}


def register_model(name, builder=None):
    """Register ``builder`` under ``name``; usable as ``@register_model(name)``."""
    def decorator(function):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = function
        return function

    return decorator(builder) if builder is not None else decorator


def _import_families():
    for module in FAMILIES:
        importlib.import_module(module)


def list_models():
    """Every registered architecture name, in registration order."""
    _import_families()
    return list(MODELS)


def build_feature_layers(name, input_shape, num_classes, config):
    _import_families()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    from keras_local.models.modules import group_into_modules

    layers = MODELS[name](tuple(input_shape), num_classes, config)
    return group_into_modules(layers, getattr(config, "modules", None))
