"""Back-prop-free pieces of the 'bio' variant: feedback alignment and label projection."""

import keras
from keras import ops

def _fa_matmul(inputs, kernel, bias, feedback):
    """inputs @ kernel + bias whose gradient to ``inputs`` uses ``feedback``, not ``kernel``.

    inputs: (batch, fan_in); kernel, feedback: (fan_in, units); bias: (units,).
    """

    @ops.custom_gradient
    def forward(x, w, b):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            grad_x = ops.matmul(upstream, ops.transpose(feedback))
            grad_w = ops.matmul(ops.transpose(x), upstream)
            grad_b = ops.sum(upstream, axis=0)
            return grad_x, grad_w, grad_b

        return ops.matmul(x, w) + b, grad

    return forward(inputs, kernel, bias)


@keras.saving.register_keras_serializable(package="keras_local")
class FeedbackAlignmentDense(keras.layers.Layer):
    """Dense layer trained by feedback alignment (Lillicrap et al. 2014).

    Forward: x W + b. The gradient passed back to x is upstream @ Bᵀ with B a fixed
    random matrix of W's shape (a non-trainable weight, saved with the model); the
    gradients of W and b are the ordinary ones. Kernel and bias start at zero, B is
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in the reference's ``LinearFA`` pred head.
    Inputs must be (batch, features).
    """

    def __init__(self, units, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.seed = seed

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"FeedbackAlignmentDense needs (batch, features) inputs, got {tuple(input_shape)}")
        fan_in = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(fan_in, self.units), initializer="zeros"
        )
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        limit = 1.0 / fan_in**0.5
        self.feedback = self.add_weight(
            name="feedback",
            shape=(fan_in, self.units),
            initializer=keras.initializers.RandomUniform(-limit, limit, seed=self.seed),
            trainable=False,
        )

    def call(self, inputs):
        kernel = ops.cast(self.kernel, inputs.dtype)
        bias = ops.cast(self.bias, inputs.dtype)
        feedback = ops.stop_gradient(ops.cast(self.feedback, inputs.dtype))
        return _fa_matmul(inputs, kernel, bias, feedback)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_local")
class LabelProjection(keras.layers.Layer):
    """A fixed random projection P (num_classes x target_proj_size) of one-hot labels.

    Never trained; stored as a non-trainable weight so that it survives save/reload.
    Initialised like the reference's ``nn.Linear(num_classes, size, bias=False)``:
    U(-1/sqrt(num_classes), 1/sqrt(num_classes)). Always computes in float32.
    """

    def __init__(self, num_classes, target_proj_size, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.target_proj_size = target_proj_size
        self.seed = seed

    def build(self, input_shape=None):
        limit = 1.0 / self.num_classes**0.5
        self.projection = self.add_weight(
            name="projection",
            shape=(self.num_classes, self.target_proj_size),
            initializer=keras.initializers.RandomUniform(-limit, limit, seed=self.seed),
            trainable=False,
        )

    def call(self, labels_onehot):
        projection = ops.stop_gradient(ops.cast(self.projection, "float32"))
        return ops.matmul(ops.cast(labels_onehot, "float32"), projection)

    def binary_targets(self, labels_onehot):
        """(onehot(y) P > 0) as float32 {0, 1} targets of the bio pred head."""
        return ops.cast(self(labels_onehot) > 0, "float32")

    def class_codes(self):
        """Each class's ±1 code sign(P), (num_classes, target_proj_size), float32."""
        return 2.0 * ops.cast(self.projection > 0, "float32") - 1.0

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.target_proj_size,)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "target_proj_size": self.target_proj_size,
            "seed": self.seed,
        }
