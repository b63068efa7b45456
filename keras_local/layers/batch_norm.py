"""BatchNormalization whose moving variance is updated as PyTorch's is."""

import keras
from keras import ops

from keras_local import tf_gradients


@keras.saving.register_keras_serializable(package="keras_local")
class TorchBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization, except that in training the moving variance is
    updated with the *unbiased* batch variance, variance * N / (N - 1), with N the
    number of values per channel (batch x spatial positions), as torch.nn.BatchNorm does.
    The batch itself is still normalised with the biased variance (both frameworks), and
    inference is Keras's unchanged (so it exports like any BatchNormalization).
    Renormalisation, masks and synchronized statistics are not supported.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for option in ("renorm", "synchronized"):
            if getattr(self, option, False):
                raise ValueError(f"TorchBatchNormalization does not support {option}=True")

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError("TorchBatchNormalization does not support masks")
        inputs = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        if self._fused_available(inputs):
            outputs, mean, unbiased = self._fused_training(inputs)
        else:
            outputs, mean, unbiased = self._unfused_training(inputs, mask)
        self._assign_moving_statistics(mean, unbiased)
        return ops.cast(outputs, self.compute_dtype)

    def _assign_moving_statistics(self, mean, unbiased):
        momentum = self.momentum
        self.moving_mean.assign(
            ops.cast(self.moving_mean, mean.dtype) * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            ops.cast(self.moving_variance, unbiased.dtype) * momentum
            + unbiased * (1.0 - momentum))

    def _unbiased(self, inputs, variance):
        shape = ops.shape(inputs)
        count = ops.cast(ops.prod(ops.convert_to_tensor(shape)) // shape[self.axis],
                         inputs.dtype)
        # max(N - 1, 1): a single value per channel (where PyTorch refuses to train)
        # keeps its biased variance 0 rather than dividing by zero.
        return variance * count / ops.maximum(count - 1.0, 1.0)

    def _fused_available(self, inputs):
        """TensorFlow's fused kernel: NHWC feature maps normalised over the channels."""
        return (keras.backend.backend() == "tensorflow" and len(inputs.shape) == 4
                and self.axis in (-1, 3) and self.center and self.scale)

    def _fused_training(self, inputs):
        """(outputs, batch mean, unbiased batch variance): ``tf_gradients.batch_norm``,
        statistics summed a few terms at a time, then normalised by FusedBatchNormV3 in
        inference mode (one pass). TensorFlow's fused training kernel accumulates the mean
        in one float32 running sum per channel, 3.9e-5 relative off on a 32x28x28x128
        conv output, PyTorch ~1e-7."""
        import tensorflow as tf

        outputs, mean, variance = tf_gradients.batch_norm(
            inputs, tf.cast(self.gamma, inputs.dtype), tf.cast(self.beta, inputs.dtype),
            self.epsilon)
        return outputs, mean, self._unbiased(inputs, variance)

    def _moments(self, inputs, mask):
        """Batch mean and biased variance; on TensorFlow ``tf_gradients.moments`` (short
        partial sums, see ``tf_gradients.channel_sum``) where ``tf.nn.moments`` keeps one
        float32 running sum per channel."""
        last = self.axis in (-1, len(inputs.shape) - 1)
        if mask is not None or not last or keras.backend.backend() != "tensorflow":
            return super()._moments(inputs, mask)
        return tf_gradients.moments(inputs)

    def _unfused_training(self, inputs, mask):
        mean, variance = self._moments(inputs, mask)
        outputs = ops.batch_normalization(
            x=inputs, mean=mean, variance=variance, axis=self.axis,
            offset=ops.cast(self.beta, inputs.dtype) if self.center else None,
            scale=ops.cast(self.gamma, inputs.dtype) if self.scale else None,
            epsilon=self.epsilon)
        return outputs, mean, self._unbiased(inputs, variance)

    def fuses_leaky_relu(self, inputs):
        """Whether ``leaky_relu_training`` applies: TensorFlow outside XLA, float32,
        scale and centre, normalising the last axis."""
        axis = self.axis if self.axis >= 0 else self.axis + len(inputs.shape)
        return (tf_gradients.active() and self.trainable and self.center and self.scale
                and self.compute_dtype == "float32" and inputs.dtype == "float32"
                and axis == len(inputs.shape) - 1)

    def leaky_relu_training(self, inputs, negative_slope):
        """LeakyReLU(self(inputs, training=True)) with a gradient that reads only the
        output (``keras_local.tf_gradients.batch_norm_leaky_relu``): the BatchNorm input
        need not stay alive until the backward pass. Check ``fuses_leaky_relu`` first."""
        outputs, mean, variance = tf_gradients.batch_norm_leaky_relu(
            inputs, ops.cast(self.gamma, inputs.dtype), ops.cast(self.beta, inputs.dtype),
            self.epsilon, negative_slope)
        self._assign_moving_statistics(mean, self._unbiased(inputs, variance))
        return outputs
