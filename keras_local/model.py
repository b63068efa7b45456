"""LocalModel: a stack of local blocks trained inside Keras's own fit()."""

import keras
from keras import ops

from keras_local.architectures import build_feature_layers
from keras_local.blocks import LocalBlock
from keras_local.config import Config
from keras_local.heads import torch_kernel_initializer
from keras_local.optim import make_optimizer
from keras_local.similarity import error_percent, pred_loss


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
    """

    def __init__(self, architecture, input_shape, num_classes, config=None, **kwargs):
        super().__init__(**kwargs)
        if config is None:
            config = Config()
        elif isinstance(config, dict):
            config = Config.from_dict(config)
        self.config = config
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
        self.build((None,) + self.example_shape)

    # ----------------------------------------------------------------- structure
    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.feature_layers:
            if not layer.built:
                layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        if not self.output_layer.built:
            self.output_layer.build(shape)
        self.built = True

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
        for layer in self.feature_layers:
            h = layer(h, training=training)
        return self.output_layer(h)

    def inference_model(self):
        """A plain functional Keras model sharing this model's backbone layers.

        No heads, no dropout; BatchNorm uses its moving statistics. Its predictions
        equal ``self(x, training=False)``.
        """
        inputs = keras.Input(shape=self.example_shape, name="image")
        h = inputs
        for layer in self.feature_layers:
            if isinstance(layer, LocalBlock):
                for inner in layer.inference_layers():
                    h = inner(h)
            else:
                h = layer(h)
        outputs = self.output_layer(h)
        return keras.Model(inputs, outputs, name=f"{self.architecture}_inference")

    def compile(self, optimizer=None, jit_compile=None, **kwargs):
        """Keras compile with the config's optimiser and XLA choice as defaults."""
        if optimizer is None:
            optimizer = make_optimizer(self.config)
        if jit_compile is None:
            jit_compile = self.config.jit_compile
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    # ------------------------------------------------------------------ training
    def train_step(self, data):
        inputs, labels = data[0], data[1]
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        labels_onehot = ops.one_hot(labels, self.num_classes)
        logits = self._backend_step_module().train_step(self, inputs, labels_onehot)
        self._update_output_metrics(logits, labels_onehot, labels)
        return {m.name: m.result() for m in self.metrics}

    def _backend_step_module(self):
        """The module whose ``train_step(model, inputs, labels_onehot)`` updates the model."""
        backend = keras.backend.backend()
        if backend != "tensorflow":
            raise NotImplementedError(
                f"LocalModel trains on the tensorflow backend; got {backend!r}")
        if self.config.pipeline:
            from keras_local import pipeline

            return pipeline
        from keras_local import tf_step

        return tf_step

    def test_step(self, data):
        inputs, labels = data[0], data[1]
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        logits = self(inputs, training=False)
        self._update_output_metrics(logits, ops.one_hot(labels, self.num_classes), labels)
        return {"loss": self.loss_tracker.result(), "error": self.error_tracker.result()}

    def _update_output_metrics(self, logits, labels_onehot, labels):
        batch = ops.cast(ops.shape(labels)[0], "float32")
        self.loss_tracker.update_state(pred_loss(logits, labels_onehot), sample_weight=batch)
        self.error_tracker.update_state(error_percent(logits, labels), sample_weight=batch)

    def with_weight_decay(self, grads, variables):
        """The reference's coupled L2 weight decay: g + weight_decay * w."""
        decay = self.config.weight_decay
        if not decay:
            return grads
        return [g + decay * ops.cast(v, g.dtype) for g, v in zip(grads, variables)]

    # ------------------------------------------------------------- serialisation
    def get_config(self):
        return {
            "name": self.name,
            "architecture": self.architecture,
            "input_shape": list(self.example_shape),
            "num_classes": self.num_classes,
            "config": self.config.to_dict(),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_model(name, input_shape, num_classes, config=None):
    """Build the named architecture (``ARCHITECTURES``) as a LocalModel."""
    return LocalModel(name, input_shape, num_classes, config)
