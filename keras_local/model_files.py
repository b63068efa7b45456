"""Model configs from files (``.keras`` archives, a run's ``config.json``) are untrusted:
bound what a config would build before building it.

A 600 KB ``.keras`` file whose config asks for three 16384-unit layers made Keras
allocate 8 GB before anything could refuse it. ``check_model_size`` computes the
parameter count from the layer shapes alone (layers are constructed, never built: no
variable exists yet) and refuses a config above ``MAX_PARAMETERS``.
"""

import json
import math
import zipfile

from keras_local.config import Config

# Encoder + output weights (heads excluded). The paper's largest network, vgg11b (3x) on
# CIFAR-10, has 91.3M; the sim heads about double a model and Adam triples that again,
# so 300M backbone parameters already need some 10 GB.
MAX_PARAMETERS = 300_000_000
MAX_LAYERS = 1_000
MAX_CONFIG_BYTES = 1 << 20  # config.json inside a .keras archive


class ModelFileError(ValueError):
    """A model file or config that is unreadable, not a LocalModel, or too large to build."""


def estimated_parameters(architecture, input_shape, num_classes, config):
    """Weights of the encoders and the output layer the model would have (heads
    excluded, so a lower bound of the model's size), from layer shapes only."""
    from keras_local.layers.block import LocalBlock
    from keras_local.models.registry import build_feature_layers

    if config.num_layers > MAX_LAYERS:
        raise ModelFileError(f"the model config asks for {config.num_layers} layers, above "
                             f"the limit of {MAX_LAYERS}")
    shape = (None,) + tuple(int(d) for d in input_shape)
    total = 0
    for layer in build_feature_layers(architecture, shape[1:], num_classes, config):
        if isinstance(layer, LocalBlock):
            fan_in = shape[-1] * (layer.kernel_size ** 2 if layer.kind == "conv" else 1)
            total += (fan_in + 1) * layer.width
        shape = tuple(layer.compute_output_shape(shape))
    return total + (math.prod(shape[1:]) + 1) * int(num_classes)


def check_model_size(architecture, input_shape, num_classes, config,
                     max_parameters=MAX_PARAMETERS, source="the model config"):
    """ModelFileError when the model would exceed ``max_parameters``; else its estimate."""
    if isinstance(config, dict):
        config = Config.from_dict(config)
    if any(int(d) < 1 for d in input_shape) or int(num_classes) < 1:
        raise ModelFileError(f"{source}: input shape {list(input_shape)} and "
                             f"{num_classes} classes must be positive")
    count = estimated_parameters(architecture, input_shape, num_classes, config)
    if count > max_parameters:
        raise ModelFileError(
            f"{source} asks for {count:,} parameters (encoders and output alone), above "
            f"the limit of {max_parameters:,}: refused before building it")
    return count


def read_keras_config(path):
    """The model config (``config.json``) of a ``.keras`` archive, size-checked first."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelFileError(f"{path}: config.json declares {info.file_size:,} bytes, "
                                     f"above {MAX_CONFIG_BYTES:,}")
            with archive.open(info) as stream:
                text = stream.read(MAX_CONFIG_BYTES + 1)
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise ModelFileError(f"{path} is not a .keras model file ({error})") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{path}: config.json is larger than {MAX_CONFIG_BYTES:,} bytes")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: config.json is not JSON ({error})") from None


def check_keras_file(path, max_parameters=MAX_PARAMETERS):
    """Refuse a ``.keras`` file that does not hold a LocalModel of a sane size."""
    stored = read_keras_config(path)
    if not isinstance(stored, dict) or stored.get("class_name") != "LocalModel":
        name = stored.get("class_name") if isinstance(stored, dict) else type(stored).__name__
        raise ModelFileError(f"{path} holds a {name}, not a keras-local LocalModel")
    values = stored.get("config")
    try:
        check_model_size(values["architecture"], values["input_shape"], values["num_classes"],
                         values["config"], max_parameters, source=str(path))
    except (KeyError, TypeError) as error:
        raise ModelFileError(f"{path}: not a LocalModel config ({error!r})") from None
