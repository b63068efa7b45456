"""BatchNormalization whose moving variance is updated as PyTorch's is."""

import keras
from keras import ops


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
        mean, variance = self._moments(inputs, mask)
        shape = ops.shape(inputs)
        count = ops.cast(ops.prod(ops.convert_to_tensor(shape)) // shape[self.axis],
                         inputs.dtype)
        # max(N - 1, 1): a single value per channel (where PyTorch refuses to train)
        # keeps its biased variance 0 rather than dividing by zero.
        unbiased = variance * count / ops.maximum(count - 1.0, 1.0)
        momentum = self.momentum
        self.moving_mean.assign(
            ops.cast(self.moving_mean, inputs.dtype) * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            ops.cast(self.moving_variance, inputs.dtype) * momentum
            + unbiased * (1.0 - momentum))
        outputs = ops.batch_normalization(
            x=inputs, mean=mean, variance=variance, axis=self.axis,
            offset=ops.cast(self.beta, inputs.dtype) if self.center else None,
            scale=ops.cast(self.gamma, inputs.dtype) if self.scale else None,
            epsilon=self.epsilon)
        return ops.cast(outputs, self.compute_dtype)
