"""Model configs from files (``.keras`` archives, a run's ``config.json``) and from the
command line are bounded before anything is built: what is accepted can be built here.

A 600 KB ``.keras`` file whose config asks for three 16384-unit layers made Keras
allocate 8 GB before anything could refuse it. ``estimate_variables`` counts every
variable the model would create (encoders, BatchNorm, shortcuts, output layer, the pred
and sim heads, bio feedback and label-projection matrices) from the layer shapes alone:
layers are constructed, never built, so no variable exists yet. ``check_model_size``
adds the gradients and the optimiser's slots and refuses a model above ``MAX_PARAMETERS``
variables or larger than the memory available; a ``.keras`` file (or a resumed run's
checkpoint) must also hold weights enough for the variables its config declares.
"""

import dataclasses
import math
import os
import zipfile

from keras_local.config import network_part
from keras_local.run.json_files import JSONFileError, parse_json_bytes

# Every variable of the model, heads included: the paper's largest network, vgg11b (3x)
# on CIFAR-10, has 192M with its heads; every registered architecture at its defaults
# stays below this on 32-pixel inputs (resnet152: 653M, its sim heads dominate) and all
# but resnet152 (1.2G) on 224-pixel ones. The memory available bounds what is below.
MAX_PARAMETERS = 1_000_000_000
MAX_LAYERS = 1_000
MAX_CONFIG_BYTES = 1 << 20  # config.json inside a .keras archive
WEIGHTS_FILE = "model.weights.h5"  # the variables inside a .keras archive
BYTES_PER_VARIABLE = 4      # variables stay float32 under the mixed-precision policies
# Optimiser slots per trainable variable (keras_local.optimizers): Adam's m and v,
# AMSGrad's m, v and max v, SGD's momentum buffer (none without momentum).
OPTIMIZER_SLOTS = {"adam": 2, "keras_adam": 2, "amsgrad": 3, "sgd": 1}


class ModelFileError(ValueError):
    """A model file or config that is unreadable, not a LocalModel, or too large to build."""


@dataclasses.dataclass
class SizeEstimate:
    """Variables a model would create: ``trainable`` (encoders, heads, BatchNorm scales,
    the output layer) and ``non_trainable`` (BatchNorm moving statistics, feedback and
    label-projection matrices); ``slots`` optimiser slots per trainable variable, and in
    training one gradient per trainable variable (``gradients``)."""
    trainable: int
    non_trainable: int
    slots: int = 0
    gradients: bool = False

    @property
    def variables(self):
        return self.trainable + self.non_trainable

    @property
    def bytes(self):
        """Memory of the variables, slots and gradients (activations not included)."""
        per_trainable = self.slots + int(self.gradients)
        return BYTES_PER_VARIABLE * (self.variables + per_trainable * self.trainable)


def optimizer_slots(config):
    if config.optim == "sgd" and not config.momentum:
        return 0
    return OPTIMIZER_SLOTS[config.optim]


def estimate_variables(architecture, input_shape, num_classes, config):
    """(trainable, non-trainable) variables of the LocalModel ``architecture`` would be
    with ``config``, heads included, from layer shapes only."""
    import keras

    from keras_local.layers.block import LocalBlock
    from keras_local.models.registry import build_feature_layers

    if config.num_layers > MAX_LAYERS:
        raise ModelFileError(f"the model config asks for {config.num_layers} layers, above "
                             f"the limit of {MAX_LAYERS}")
    shape = (None,) + tuple(int(d) for d in input_shape)
    trainable = non_trainable = 0
    for layer in build_feature_layers(architecture, shape[1:], num_classes, config):
        if isinstance(layer, LocalBlock):
            counts = _block_variables(layer, shape)
        elif isinstance(layer, keras.layers.BatchNormalization):
            counts = _batch_norm(shape[-1])
        else:  # pooling, flatten, activations: no variables
            counts = (0, 0)
        trainable, non_trainable = trainable + counts[0], non_trainable + counts[1]
        shape = tuple(layer.compute_output_shape(shape))
    trainable += (math.prod(shape[1:]) + 1) * int(num_classes)  # the output Dense
    return trainable, non_trainable


def _batch_norm(channels):
    return 2 * channels, 2 * channels  # gamma, beta; moving mean and variance


def _block_variables(block, shape):
    """(trainable, non-trainable) of one LocalBlock or ResidualConv on input ``shape``
    (a residual conv in the middle or at the end of its block: (x shape, skip shape))."""
    from keras_local.layers.heads import decoder_pool_geometry

    nested = getattr(block, "role", None) in ("middle", "last")
    x_shape, skip_shape = (tuple(shape[0]), tuple(shape[1])) if nested else (shape, shape)
    counts = [0, 0]

    def add(pair):
        counts[0] += pair[0]
        counts[1] += pair[1]

    if getattr(block, "bn_pre", None) is not None:
        add(_batch_norm(x_shape[-1]))
    receptive_field = block.kernel_size ** 2 if block.kind == "conv" else 1
    add(((x_shape[-1] * receptive_field + int(block.use_bias)) * block.width, 0))
    h_shape = x_shape
    for layer in (block.encoder_padding, block.encoder):
        if layer is not None:
            h_shape = tuple(layer.compute_output_shape(h_shape))
    if block.bn is not None:
        add(_batch_norm(block.width))
    if getattr(block, "shortcut", None) is not None:
        add(_block_variables(block.shortcut, skip_shape))
    projection_size = block.projection.target_proj_size if block.projection else None
    if block.projection is not None:
        add((0, block.num_classes * projection_size))
    if "pred" in block.heads:
        fan_in = math.prod(h_shape[1:])
        if len(h_shape) == 4:
            size, channels = h_shape[1], h_shape[3]
            kernel_h, kernel_w, pad_h, pad_w = decoder_pool_geometry(
                channels, size, block.dim_in_decoder)
            fan_in = channels * ((size + 2 * pad_h - kernel_h) // kernel_h + 1) * (
                (size + 2 * pad_w - kernel_w) // kernel_w + 1)
        if projection_size is None:
            add(((fan_in + 1) * block.num_classes, 0))
        else:  # feedback alignment: kernel and bias, and the fixed feedback matrix
            add(((fan_in + 1) * projection_size, fan_in * projection_size))
    if "sim" in block.heads and projection_size is None:  # bio: S of the pooled h
        channels = h_shape[-1]
        add((channels * channels * (9 if len(h_shape) == 4 else 1), 0))
    if "decoder" in block.heads:
        target, inner = x_shape[-1], h_shape[-1]
        add(((inner * receptive_field + 1) * target, 0))
    return tuple(counts)


# (limit, usage) files of the cgroup v2 and v1 memory controllers
CGROUP_MEMORY_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                        "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def memory_available():
    """Bytes this process may still allocate: MemAvailable of /proc/meminfo, lowered by
    a cgroup memory limit when one is set; None where neither can be read."""
    available = []
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    available.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in CGROUP_MEMORY_FILES:
        try:
            with open(limit_file) as stream:
                limit = stream.read().strip()
            with open(usage_file) as stream:
                used = int(stream.read().strip())
            if limit != "max":  # v1 writes "no limit" as a huge number: min() ignores it
                available.append(max(int(limit) - used, 0))
        except (OSError, ValueError):
            pass
    return min(available) if available else None


def check_model_size(architecture, input_shape, num_classes, config,
                     max_parameters=MAX_PARAMETERS, source="the model config",
                     training=True, available_bytes=None):
    """ModelFileError when the model would exceed ``max_parameters`` variables, or when
    its variables (and, when ``training``, their gradients and the optimiser's slots) would
    not fit in ``available_bytes`` (default: ``memory_available()``); else its
    SizeEstimate."""
    if isinstance(config, dict):  # a model file's: the network part, no optimiser
        config = network_part(config)
    if (not isinstance(input_shape, (list, tuple)) or not input_shape
            or not all(_is_count(d) for d in input_shape) or not _is_count(num_classes)):
        raise ModelFileError(f"{source}: input shape {input_shape!r} and {num_classes!r} "
                             f"classes must be positive integers")
    if num_classes < 2:
        raise ModelFileError(f"{source}: {num_classes} class; a classifier needs two or more")
    estimate = SizeEstimate(*estimate_variables(architecture, input_shape, num_classes, config),
                            slots=optimizer_slots(config) if training else 0,
                            gradients=training)
    what = (f"{source} asks for {estimate.variables:,} variables (heads, feedback and "
            f"projection matrices included)")
    if estimate.variables > max_parameters:
        raise ModelFileError(f"{what}, above the limit of {max_parameters:,}: refused "
                             f"before building it")
    available = memory_available() if available_bytes is None else available_bytes
    if available is not None and estimate.bytes > available:
        extra = (f", with their gradients and {config.optim}'s {estimate.slots} optimiser "
                 f"slots per trainable one" if training else "")
        raise ModelFileError(f"{what}{extra}: {_gib(estimate.bytes)} GiB, above the "
                             f"{_gib(available)} GiB of memory available: refused before "
                             f"building it")
    return estimate


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _gib(count):
    return f"{count / 2**30:.2f}"


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
    try:
        return parse_json_bytes(text, f"{path}: config.json", MAX_CONFIG_BYTES)
    except JSONFileError as error:
        raise ModelFileError(str(error)) from None


def check_keras_file(path, max_parameters=MAX_PARAMETERS, training=False,
                     available_bytes=None):
    """Refuse a ``.keras`` file that does not hold a LocalModel of a size this machine can
    build (``training``: with the optimiser's slots); else its SizeEstimate."""
    stored = read_keras_config(path)
    if not isinstance(stored, dict) or stored.get("class_name") != "LocalModel":
        name = stored.get("class_name") if isinstance(stored, dict) else type(stored).__name__
        raise ModelFileError(f"{path} holds a {name}, not a keras-local LocalModel")
    values = stored.get("config")
    try:
        estimate = check_model_size(values["architecture"], values["input_shape"],
                                    values["num_classes"], values["config"], max_parameters,
                                    source=str(path), training=training,
                                    available_bytes=available_bytes)
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: not a valid LocalModel config ({_one_line(error)})") \
            from None
    _check_weights_size(path, estimate)
    return estimate


def _keras_weights_bytes(path):
    """The declared size of the weights inside a ``.keras`` archive; None without them."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.getinfo(WEIGHTS_FILE).file_size
    except (OSError, KeyError, zipfile.BadZipFile):
        return None


def _check_weights_size(path, estimate):
    """Refuse a ``.keras`` file whose weights file is too small to hold the variables its
    config declares: a config alone (a few KB) would otherwise make Keras build the whole
    model before the weights fail to load."""
    needed = BYTES_PER_VARIABLE * estimate.variables
    declared = _keras_weights_bytes(path)
    if declared is None:
        raise ModelFileError(f"{path} holds no {WEIGHTS_FILE}: not a saved model")
    if declared < needed:
        raise ModelFileError(f"{path}: its config declares {estimate.variables:,} variables "
                             f"({needed:,} bytes) but {WEIGHTS_FILE} holds {declared:,} "
                             f"bytes: refused before building it")


def check_resume_states(run_dir, estimate):
    """Refuse to resume ``run_dir`` when its checkpoint is a readable ``.keras`` file whose
    weights cannot hold the variables ``config.json`` declares (config.json was changed):
    the model would otherwise be built before restoring fails. An unreadable checkpoint is
    left to ``keras_local.run.resume``, which names it."""
    checkpoint = os.path.join(run_dir, "checkpoints", "last.keras")
    held = _keras_weights_bytes(checkpoint) if os.path.isfile(checkpoint) else None
    needed = BYTES_PER_VARIABLE * estimate.variables
    if held is not None and held < needed:
        raise ModelFileError(f"--resume {run_dir}: config.json declares "
                             f"{estimate.variables:,} variables ({needed:,} bytes) but "
                             f"checkpoints/last.keras holds {held:,} bytes of weights: was "
                             f"config.json changed? Refused before building it")


def _one_line(error):
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
