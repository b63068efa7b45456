"""LocalModel: a stack of local blocks trained inside Keras's own fit()."""

import contextlib

import keras
from keras import ops

from keras_local.models.registry import build_feature_layers
from keras_local.layers.block import LocalBlock, part_seed
from keras_local.config import Config, RunConfig, network_part
from keras_local.layers.heads import torch_bias_initializer, torch_kernel_initializer
from keras_local.models.common import block_seed
from keras_local.optimizers import make_optimizer
from keras_local.steps import step_functions
from keras_local.losses.maths import error_percent, pred_loss


XLA_PARTS = ("update", "step")


def xla_part(jit_compile, has_conv, backend):
    """What XLA compiles of a LocalModel's train step: "update" (only the optimiser update,
    ``keras_local.steps.tensorflow``), "step" (Keras's jit_compile of the whole step) or
    "none". ``jit_compile`` True picks "update" for TensorFlow networks with conv blocks and
    "step" otherwise (see ``LocalModel.compile``); "update" or "step" asks for that part
    (other backends have only "step")."""
    if jit_compile in XLA_PARTS:
        return jit_compile if backend == "tensorflow" else "step"
    if not jit_compile:
        return "none"
    return "update" if backend == "tensorflow" and has_conv else "step"


@keras.saving.register_keras_serializable(package="keras_local")
class LocalModel(keras.Model):
    """A network whose hidden blocks learn from their own local losses.

    ``config.training_mode`` picks the update rule:
      - "pred" / "sim" / "predsim": each block k is trained only by its own local
        loss on a gradient-stopped input; the output Dense (zero-initialised) by its
        cross-entropy on a gradient-stopped input, scaled by 1 - beta in predsim.
      - "no_detach": the same losses, summed, with gradients crossing blocks.
      - "backprop": one cross-entropy at the output, no heads.

    Metrics: ``loss`` (output cross-entropy, unscaled), ``error`` (%), and for
    every block ``block_k_pred_loss``, ``block_k_sim_loss``, ``block_k_error``.

    The model knows its network, not the run: whoever builds it for a run
    (``keras_local.run.training.build_model``) hands it
      - ``placement``: a function ``feature_layers -> (device per layer, output device)``
        (layer-wise placement), or None;
      - ``pipelined``: train with the pipelined executor (boundary buffers);
      - ``variable_scope``: a context manager the variables are created in (replica-state
        aggregation under tf.distribute), or None;
      - ``preprocessing``: ``{"dataset", "mean", "std", "class_names"}`` of its inputs,
        saved with the model and used by the export.
    Only the network part of ``config`` (``Config.network_dict``) is saved with it: a
    loaded model's ``config`` is a ``NetworkConfig``, without run options (so ``compile``
    then needs its optimizer, unless Keras restores the saved compile state).
    """

    def __init__(self, architecture, input_shape, num_classes, config=None, placement=None,
                 pipelined=False, variable_scope=None, preprocessing=None, **kwargs):
        super().__init__(**kwargs)
        if config is None:
            config = Config()
        elif isinstance(config, dict):  # get_config's: the network part
            config = network_part(config)
        check_network_support(config, keras.backend.backend())
        self.config = config
        self.placement = placement
        self.preprocessing = preprocessing
        self.architecture = architecture
        self.example_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.feature_layers = build_feature_layers(architecture, self.example_shape,
                                                   num_classes, config)
        local = config.training_mode != "backprop"
        self.output_layer = keras.layers.Dense(
            num_classes,
            kernel_initializer="zeros" if local else torch_kernel_initializer(config.seed),
            dtype=config.precision, name="output")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.error_tracker = keras.metrics.Mean(name="error")
        with variable_scope() if variable_scope else contextlib.nullcontext():
            self.build((None,) + self.example_shape)
        self.xla_update = False  # set by compile
        self.pipeline_buffers = None
        if pipelined:
            from keras_local.steps.pipeline import PipelineBuffers

            self.pipeline_buffers = PipelineBuffers(self)

    # ----------------------------------------------------------------- structure
    def build(self, input_shape):
        shape = tuple(input_shape)
        layer_devices, output_device = self.layer_devices()
        for layer, device in zip(self.feature_layers, layer_devices):
            if not layer.built:
                with _on_device(device):
                    layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        if not self.output_layer.built:
            # PyTorch's default bias (the reference zeroes only the weight in local modes),
            # seeded like a block's encoder bias from the unused block index 0.
            self.output_layer.bias_initializer = torch_bias_initializer(
                shape[-1], part_seed(block_seed(self.config, 0), "encoder_bias"))
            with _on_device(output_device):
                self.output_layer.build(shape)
        self.built = True

    def layer_devices(self):
        """(device of each feature layer, device of the output layer) under the placement
        the model was given; all None without."""
        if self.placement is None:
            return [None] * len(self.feature_layers), None
        return self.placement(self.feature_layers)

    @property
    def local_blocks(self):
        return [layer for layer in self.feature_layers if isinstance(layer, LocalBlock)]

    @property
    def metrics(self):
        block_metrics = [m for block in self.local_blocks for m in block.local_metrics.values()]
        return [self.loss_tracker, self.error_tracker] + block_metrics

    def backbone_variables(self):
        """Variables that remain for inference: encoders, BatchNorm, output layer."""
        return self.inference_model().weights

    def call(self, inputs, training=False):
        h = inputs
        layer_devices, output_device = self.layer_devices()
        for layer, device in zip(self.feature_layers, layer_devices):
            with _on_device(device):
                h = layer(h, training=training)
        with _on_device(output_device):
            return self.output_layer(h)

    def inference_model(self):
        """A plain functional Keras model sharing this model's backbone layers.

        No heads, no dropout; BatchNorm uses its moving statistics. Its predictions
        equal ``self(x, training=False)``.
        """
        inputs = keras.Input(shape=self.example_shape, name="image")
        h = inputs
        for layer in self.feature_layers:
            if hasattr(layer, "inference_call"):  # residual convs: (h, shortcut) tuples
                h = layer.inference_call(h)
            elif isinstance(layer, LocalBlock):
                for inner in layer.inference_layers():
                    h = inner(h)
            else:
                h = layer(h)
        outputs = self.output_layer(h)
        return keras.Model(inputs, outputs, name=f"{self.architecture}_inference")

    def compile(self, optimizer=None, jit_compile=None, **kwargs):
        """Keras compile with the config's optimiser and XLA choice as defaults.

        On TensorFlow, for networks with conv blocks XLA compiles only the optimiser
        update of the train step (``xla_update``, see ``keras_local.steps.tensorflow``): compiled
        whole, XLA ignores the block order that lets local training free each block's
        activations (vgg19 predsim then needed as much memory as backprop), and its CPU
        convolutions were slower than TensorFlow's. Dense-only networks (mlp) compile the
        whole step, which was fastest for them (docs/benchmarks.md section 5).
        ``jit_compile="update"`` or ``"step"`` asks for one of the two whatever the network
        (``xla_part``). ``steps_per_execution`` defaults to
        ``Config.resolved_steps_per_execution``.
        A model built from a ``NetworkConfig`` alone (a loaded one) has no run options:
        ``optimizer`` is then required, and ``jit_compile`` and ``steps_per_execution``
        take Keras's defaults (XLA where it applies, 1).
        """
        run = self.config if isinstance(self.config, RunConfig) else None
        if optimizer is None:
            if run is None:
                raise ValueError("this model holds only its network options (NetworkConfig, "
                                 "as a loaded model does): pass compile(optimizer=...)")
            optimizer = make_optimizer(run)
        if jit_compile is None:
            # config.jit_compile means XLA (TensorFlow, JAX); torch.compile is opt-in.
            # XLA compiles a one-device step: not with placement nor under a strategy.
            jit_compile = ((run is None or run.jit_compile) and keras.backend.backend() != "torch"
                           and self.placement is None and not _under_strategy())
        kwargs.setdefault("steps_per_execution",
                          run.resolved_steps_per_execution if run is not None else 1)
        replicas = _replicas()
        if kwargs["steps_per_execution"] > 1 and replicas > 1:
            # Keras 3.15's multi-step loop over a distributed iterator fails at run time
            # with 2 replicas ("You must feed a value for placeholder ... while/cond").
            raise ValueError(f"steps_per_execution {kwargs['steps_per_execution']} needs one "
                             f"replica; this strategy has {replicas}: use 1 (or 0, auto)")
        has_conv = any(block.kind == "conv" for block in self.local_blocks)
        part = xla_part(jit_compile, has_conv, keras.backend.backend())
        self.xla_update = part == "update"
        super().compile(optimizer=optimizer, jit_compile=part == "step", **kwargs)
        if self.xla_update:  # what compile_from_config restores
            self._compile_config.config["jit_compile"] = True
        if self.placement is not None:
            # Built now, each slot sits on its variable's device; built lazily while the
            # first step is traced, every slot landed on the default device.
            self.optimizer.build(self.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """TensorFlow trainer hook. Under a strategy Keras 3.15 first all-reduces a data
        batch here, which fails under MultiWorkerMirroredStrategy (keras-team/keras#20585).
        A LocalModel is built when constructed: without extra compile metrics or loss only
        the optimiser is left to build, and that needs no data.

        Without a strategy Keras leaves the optimiser to be built while the first step is
        traced; a tf.function that creates variables is traced a second time (with
        variable creation forbidden), which doubled the tracing part of the first step
        (vgg8b: about 11 s). Built here, the step is traced once."""
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        if (self._distribute_strategy is not None and self._compile_metrics is None
                and self._compile_loss is None):
            with self.distribute_strategy.scope():
                self._symbolic_build(data_batch=None)
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def compile_from_config(self, config):
        """Restores the compile state (optimiser included) when a saved model is loaded."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------------------ training
    def train_step(self, *args):
        """``train_step(data)`` on TensorFlow and torch; on JAX Keras calls the
        stateless ``train_step(state, data)`` and expects ``(logs, state)``. The update
        rule is ``keras_local.steps.rule``; the backend's executor runs it."""
        return self._steps().train_step(self, *args)

    def test_step(self, *args):
        """``test_step(data)``; on JAX the stateless ``test_step(state, data)``."""
        return self._steps().test_step(self, *args)

    def _steps(self):
        return step_functions(keras.backend.backend(), pipelined=self.pipeline_buffers is not None)

    def update_output_metrics(self, logits, labels_onehot):
        """Add a batch's output cross-entropy and error (%) to ``loss`` and ``error``."""
        labels = ops.argmax(labels_onehot, axis=-1)
        batch = ops.cast(ops.shape(labels_onehot)[0], "float32")
        self.loss_tracker.update_state(pred_loss(logits, labels_onehot), sample_weight=batch)
        self.error_tracker.update_state(error_percent(logits, labels), sample_weight=batch)

    def metric_results(self):
        """The current value of every metric, by name (a step's logs). Under layer-wise
        placement each is computed on the device that holds it."""
        results = {}
        for metric in self.metrics:
            device = metric.variables[0].value.device if self.placement is not None else None
            with _on_device(device):
                results[metric.name] = metric.result()
        return results

    # ------------------------------------------------------------- serialisation
    def get_config(self):
        """The network only: no run options, no paths of the machine that trained it."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "input_shape": list(self.example_shape),
            "num_classes": self.num_classes,
            "config": self.config.network_dict(),
            "preprocessing": self.preprocessing,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def check_network_support(config, backend):
    """ValueError for a network option this backend cannot train with."""
    if backend == "torch" and config.precision != "float32":
        # Keras 3.15's torch Variable.assign writes into the autocast copy of a float32
        # variable, so the blocks' metrics (updated inside their mixed-precision calls)
        # would silently stay at 0.
        raise ValueError(
            f"precision={config.precision!r}: supported on the tensorflow and jax backends "
            f"only, but Keras is running on 'torch'; use precision='float32' on torch")


def _replicas():
    """Replicas of the active tf.distribute strategy (1 without one or off TensorFlow)."""
    if not _under_strategy():
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def _under_strategy():
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy()


def _on_device(device):
    """``tf.device(device)`` under layer-wise placement (TensorFlow only); no scope when
    device is None."""
    if device is None:
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.device(device)


def load_model(path, compile=True):
    """Load a saved LocalModel (``.keras``). Importing this module registers keras-local's
    classes with Keras; Keras's safe mode stays on."""
    return keras.saving.load_model(path, compile=compile)
