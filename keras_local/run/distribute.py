"""Scale-out: tf.distribute strategies and layer-wise device placement.

Data parallel (``Config.strategy``):
  - "one": the default strategy (one device, no replicas).
  - "mirrored": ``tf.distribute.MirroredStrategy`` over this machine's GPUs (or its
    logical CPU devices when it has no GPU).
  - "multiworker": ``tf.distribute.MultiWorkerMirroredStrategy`` over the workers that
    the ``TF_CONFIG`` environment variable names.
  - "auto": multiworker when TF_CONFIG names more than one worker, else mirrored when
    more than one GPU is visible, else one.

Under a strategy the train step (``keras_local.steps.tensorflow``) still opens one tape per
block; every replica computes its blocks' gradients on its own slice of the global
batch, each local loss is scaled by ``1 / num_replicas_in_sync``, and Keras sums the
gradients over the replicas, so the update is the one of the mean loss over the global
batch. BatchNorm statistics and the similarity matrix of the sim loss are computed per
replica, on the replica's B/k examples: keep the per-replica batch at the paper's 128.

Layer-wise placement (``Config.placement = "layerwise"``): LocalBlock i (0-based) lives
on device i mod N of ``placement_devices()`` (GPUs, else logical CPU devices). A
parameter-free layer (pooling, flatten) runs on the device of the block it feeds; layers
after the last block and the output Dense run on the last block's device. It uses the
devices for layers, not for replicas, so it combines only with strategy "one".
"""

import contextlib
import json
import os

import tensorflow as tf

from keras_local.layers.block import LocalBlock

MULTI_DEVICE_STRATEGIES = ("mirrored", "multiworker")


def make_strategy(config, devices=None):
    """The ``tf.distribute.Strategy`` for ``config.strategy``.

    Call it before any other TensorFlow op (MultiWorkerMirroredStrategy sets up
    collective ops when the runtime starts), then build and compile the model inside
    ``strategy.scope()``. ``devices``: replica devices for "mirrored" (default: every
    GPU, else every logical CPU device).
    """
    check_scale_out(config)
    kind = resolve_strategy(config)
    if kind == "one":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy(devices or replica_devices())
    return tf.distribute.MultiWorkerMirroredStrategy()


def resolve_strategy(config):
    """"one", "mirrored" or "multiworker": what ``config.strategy`` means here."""
    if config.strategy != "auto":
        return config.strategy
    if config.placement == "layerwise":
        return "one"
    if tf_config_workers() > 1:
        return "multiworker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "one"


def check_scale_out(config):
    """Raise a one-line ValueError for a strategy / placement / pipeline combination
    that cannot work."""
    if config.backend != "tensorflow" and (
            config.strategy in MULTI_DEVICE_STRATEGIES or config.placement != "none"):
        raise ValueError(f"strategy {config.strategy!r} and placement {config.placement!r} "
                         f"need backend 'tensorflow', got {config.backend!r}")
    if config.placement == "layerwise" and config.strategy in MULTI_DEVICE_STRATEGIES:
        raise ValueError(f"placement 'layerwise' uses the devices for blocks and needs strategy "
                         f"'one' or 'auto', got {config.strategy!r}")
    if config.pipeline and config.training_mode in ("backprop", "no_detach"):
        raise ValueError(f"pipeline needs local losses (loss_sup pred, sim or predsim), "
                         f"got training mode {config.training_mode!r}")
    if config.strategy == "multiworker" and tf_config_workers() == 0:
        raise ValueError("strategy 'multiworker' needs TF_CONFIG naming the cluster's workers; "
                         "TF_CONFIG is unset or names none")


def tf_config_workers(environ=None):
    """Number of workers (chief included) that the TF_CONFIG variable names; 0 if unset."""
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG", "")
    if not text.strip():
        return 0
    try:
        cluster = json.loads(text).get("cluster", {})
    except (ValueError, AttributeError):
        raise ValueError(f"TF_CONFIG must be a JSON object with a 'cluster', got {text!r}") from None
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def is_multi_worker(strategy):
    """Whether ``strategy`` is a MultiWorkerMirroredStrategy."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Whether this process should write the run's shared outputs (checkpoints, logs,
    exports): always, except on the non-chief workers of a multi-worker cluster."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    if resolver.task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def per_worker_path(path, strategy):
    """``path`` itself, or ``path/<task type>_<index>`` on a multi-worker cluster, where
    every worker writes (Keras's BackupAndRestore saves from every worker: give each
    its own directory; the weights are the same on all)."""
    if not is_multi_worker(strategy):
        return path
    resolver = strategy.cluster_resolver
    return os.path.join(path, f"{resolver.task_type}_{resolver.task_id}")


@contextlib.contextmanager
def mean_aggregated_state():
    """Create the model's variables inside this scope: the non-trainable float variables
    that Keras creates without aggregation (BatchNorm moving statistics) get aggregation
    MEAN. Under a strategy every replica then updates them with the mean of all replicas'
    new values (the moving average of the replicas' batch statistics), and their copies
    stay identical on every replica and worker; with Keras's default each replica would
    keep its own. No effect without a strategy."""

    def creator(next_creator, **kwargs):
        dtype = kwargs.get("dtype")
        if (not kwargs.get("trainable", True) and dtype is not None
                and tf.as_dtype(dtype).is_floating
                and kwargs.get("aggregation") in (None, tf.VariableAggregation.NONE)):
            kwargs["aggregation"] = tf.VariableAggregation.MEAN
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        yield


# ----------------------------------------------------------------- placement
def replica_devices():
    """Names of this machine's GPUs, or of its logical CPU devices when it has none."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def placement_devices():
    """The devices that layer-wise placement spreads the blocks over."""
    return replica_devices()


def block_devices(model_or_blocks, devices=None):
    """Device of every LocalBlock, in order: block i on ``devices[i % len(devices)]``.

    ``model_or_blocks``: a LocalModel (its ``local_blocks``) or a list of layers.
    """
    layers = getattr(model_or_blocks, "local_blocks", model_or_blocks)
    devices = list(devices or placement_devices())
    if not devices:
        raise ValueError("block_devices needs at least one device, got none")
    blocks = [layer for layer in layers if isinstance(layer, LocalBlock)]
    return [devices[i % len(devices)] for i in range(len(blocks))]


def layerwise_devices(feature_layers, devices=None):
    """(device of each feature layer, device of the output layer).

    A LocalBlock gets its ``block_devices`` device; a parameter-free layer runs on the
    device of the next block, or of the last block when no block follows it.
    """
    per_block = block_devices(feature_layers, devices)
    if not per_block:
        raise ValueError("layerwise placement needs a model with at least one block, got none")
    layer_devices, pending, index = [], 0, 0
    for layer in feature_layers:
        if isinstance(layer, LocalBlock):
            layer_devices.extend([per_block[index]] * (pending + 1))
            pending, index = 0, index + 1
        else:
            pending += 1
    layer_devices.extend([per_block[-1]] * pending)
    return layer_devices, per_block[-1]


def device_scope(device):
    """``tf.device(device)``, or no scope when ``device`` is None (so that a strategy's
    replica device stays in force)."""
    return tf.device(device) if device else contextlib.nullcontext()


def same_device(a, b):
    """Whether two device strings name the same device ('/device:CPU:1' == '/job:localhost/
    replica:0/task:0/device:CPU:1')."""
    spec_a, spec_b = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return (spec_a.device_type, spec_a.device_index or 0) == (spec_b.device_type,
                                                              spec_b.device_index or 0)
