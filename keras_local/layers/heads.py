"""The auxiliary heads of a local block: they exist only for training."""

import math

import keras
import numpy as np
from keras import ops

from keras_local.layers.feedback import FeedbackAlignmentDense
from keras_local.losses.maths import binary_pred_loss, pred_loss, sim_loss, sim_loss_of_rows


def torch_kernel_initializer(seed=None):
    """PyTorch's default Linear/Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which the
    reference's recipes were tuned with."""
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed
    )


def torch_bias_initializer(fan_in, seed=None):
    """PyTorch's default Linear/Conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)):
    unlike a kernel's, its bound depends on a fan-in the bias's own shape does not show."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound, seed=seed)


def decoder_pool_geometry(channels, size, dim_in_decoder):
    """Average-pool kernel and padding of the pred head (docs/method.md section 4).

    Returns (kernel_h, kernel_w, pad_h, pad_w) for a (size x size x channels) map so
    that the flattened pooled size is at most ``dim_in_decoder`` where possible.
    """
    kernel_h, kernel_w = 1, 1
    out_h, out_w = size, size
    flat = channels * out_h * out_w
    while flat > dim_in_decoder and kernel_h < size:
        kernel_h *= 2
        out_h = math.ceil(size / kernel_h)
        flat = channels * out_h * out_w
        if flat > dim_in_decoder:
            kernel_w *= 2
            out_w = math.ceil(size / kernel_w)
            flat = channels * out_h * out_w
    pad_h = (kernel_h * (out_h - size // kernel_h)) // 2
    pad_w = (kernel_w * (out_w - size // kernel_w)) // 2
    return kernel_h, kernel_w, pad_h, pad_w


@keras.saving.register_keras_serializable(package="keras_local")
class DecoderPooling(keras.layers.Layer):
    """Zero-pad then average-pool with kernel = stride (padding counts in the mean,
    as PyTorch's AvgPool2d does by default); identity for dense inputs or kernel 1x1."""

    def __init__(self, dim_in_decoder, **kwargs):
        super().__init__(**kwargs)
        self.dim_in_decoder = dim_in_decoder
        self.geometry = None
        self.input_size = None  # (height, width) of a feature map input

    def build(self, input_shape):
        if len(input_shape) == 4:
            _, height, width, channels = input_shape
            if height != width:
                raise ValueError(f"pred-head pooling needs square feature maps, got {input_shape}")
            self.geometry = decoder_pool_geometry(channels, height, self.dim_in_decoder)
            self.input_size = (height, width)

    def call(self, h):
        if self.geometry is None or self.geometry[:2] == (1, 1):
            return h
        _, height, width, channels = h.shape
        out_h, out_w = self.compute_output_shape(h.shape)[1:3]
        rows, cols = self.pooling_matrices(height, width)
        # Two matrix products, columns then rows, each on a 3-D view that needs no
        # transpose. The zero padding and the cut of the far side are in the matrices:
        # padding then cropping the map cost TensorFlow (Pad, StridedSliceGrad) several
        # times the pred head's arithmetic, and ops.average_pool's gradient under XLA on
        # CPU (reduce-window) ~20x.
        h = ops.matmul(ops.cast(cols, h.dtype)[None], ops.reshape(h, (-1, width, channels)))
        h = ops.matmul(ops.cast(rows, h.dtype)[None],
                       ops.reshape(h, (-1, height, out_w * channels)))
        return ops.reshape(h, (-1, out_h, out_w, channels))

    def transpose(self, pooled):
        """The adjoint of ``call``: the gradient with respect to h of
        sum(call(h) * pooled), a map of h's shape (``pooled``: of the output's)."""
        if self.geometry is None or self.geometry[:2] == (1, 1):
            return pooled
        _, out_h, out_w, channels = pooled.shape
        height, width = self.input_size
        rows, cols = self.pooling_matrices(height, width)
        g = ops.matmul(ops.cast(rows.T, pooled.dtype)[None],
                       ops.reshape(pooled, (-1, out_h, out_w * channels)))
        g = ops.matmul(ops.cast(cols.T, pooled.dtype)[None],
                       ops.reshape(g, (-1, out_w, channels)))
        return ops.reshape(g, (-1, height, width, channels))

    def pooling_matrices(self, height, width):
        """(P_rows (out_h, height), P_cols (out_w, width)): P[i, x] = 1 / kernel when input
        position x lies in window i, which covers [i * kernel - pad, (i + 1) * kernel - pad);
        the padding's zeros count in the mean (PyTorch's count_include_pad)."""
        kernel_h, kernel_w, pad_h, pad_w = self.geometry
        out_h, out_w = self.compute_output_shape((None, height, width, None))[1:3]

        def matrix(out, size, kernel, pad):
            window = (np.arange(size)[None, :] + pad) // kernel
            return (window == np.arange(out)[:, None]).astype("float32") / kernel

        return matrix(out_h, height, kernel_h, pad_h), matrix(out_w, width, kernel_w, pad_w)

    def compute_output_shape(self, input_shape):
        if self.geometry is None or self.geometry[:2] == (1, 1):
            return tuple(input_shape)
        kernel_h, kernel_w, pad_h, pad_w = self.geometry
        batch, height, width, channels = input_shape
        return (batch, (height + 2 * pad_h - kernel_h) // kernel_h + 1,
                (width + 2 * pad_w - kernel_w) // kernel_w + 1, channels)

    def get_config(self):
        return {**super().get_config(), "dim_in_decoder": self.dim_in_decoder}


@keras.saving.register_keras_serializable(package="keras_local")
class PredHead(keras.layers.Layer):
    """Pool (feature maps only) -> flatten -> Dense(num_classes), kernel initialised to 0,
    bias to PyTorch's default (seeded by ``bias_seed``).

    With ``projection`` (bio): a feedback-alignment Dense to ``target_proj_size``
    logits, trained by sigmoid BCE against (onehot(y) P > 0).
    """

    def __init__(self, num_classes, dim_in_decoder, projection=None, seed=None, bias_seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.dim_in_decoder = dim_in_decoder
        self.seed = seed
        self.projection = _deserialize_projection(projection)
        self.bias_seed = bias_seed
        self.pool = DecoderPooling(dim_in_decoder, dtype=self.dtype_policy, name="pool")
        if self.projection is None:
            self.dense = keras.layers.Dense(
                num_classes, kernel_initializer="zeros", dtype=self.dtype_policy, name="dense"
            )
        else:
            self.dense = FeedbackAlignmentDense(
                self.projection.target_proj_size, seed=seed, dtype=self.dtype_policy, name="fa_dense"
            )

    def build(self, input_shape):
        self.pool.build(input_shape)
        pooled = self.pool.compute_output_shape(input_shape)
        fan_in = math.prod(pooled[1:])
        if self.projection is None:  # the reference zeroes the weight only (LinearFA: both)
            self.dense.bias_initializer = torch_bias_initializer(fan_in, self.bias_seed)
        self.dense.build((pooled[0], fan_in))

    def call(self, h):
        pooled = self.pool(h)
        return self.dense(ops.reshape(pooled, (ops.shape(pooled)[0], -1)))

    def loss_and_scores(self, h, labels_onehot, summary=None):
        """(local pred loss, class scores for the local-head error). ``summary``: the
        pooled map ``self.pool(h)``, computed already (h is then not read)."""
        if summary is None:
            logits = self(h)
        else:
            logits = self.dense(ops.reshape(summary, (ops.shape(summary)[0], -1)))
        if self.projection is None:
            return pred_loss(logits, labels_onehot), logits
        targets = self.projection.binary_targets(labels_onehot)
        # Class scores: how well the logits match each class's ±1 code.
        codes = self.projection.class_codes()
        scores = ops.matmul(ops.cast(logits, "float32"), ops.transpose(codes))
        return binary_pred_loss(logits, targets), scores

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "dim_in_decoder": self.dim_in_decoder, "seed": self.seed,
                "bias_seed": self.bias_seed, "projection": _serialize_projection(self.projection)}


@keras.saving.register_keras_serializable(package="keras_local")
class SimHead(keras.layers.Layer):
    """Conv2D 3x3 'same' without bias (Dense without bias for vectors), then S(.).

    Loss: MSE(S(head(h)), S(onehot(y))). With ``projection`` (bio) there is no
    conv: S is taken of the average-pooled h, and the target is S(onehot(y) P).
    """

    def __init__(self, dim_in_decoder, projection=None, seed=None, similarity_std=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.projection = _deserialize_projection(projection)
        self.dim_in_decoder = dim_in_decoder
        self.seed = seed
        self.similarity_std = similarity_std
        self.transform = None

    def build(self, input_shape):
        if self.projection is not None:
            self.transform = DecoderPooling(self.dim_in_decoder, dtype=self.dtype_policy, name="pool")
        elif len(input_shape) == 4:
            self.transform = keras.layers.Conv2D(
                input_shape[-1], 3, padding="same", use_bias=False,
                kernel_initializer=torch_kernel_initializer(self.seed),
                dtype=self.dtype_policy, name="conv",
            )
        else:
            self.transform = keras.layers.Dense(
                input_shape[-1], use_bias=False,
                kernel_initializer=torch_kernel_initializer(self.seed),
                dtype=self.dtype_policy, name="dense",
            )
        self.transform.build(input_shape)

    def call(self, h):
        return self.transform(h)

    def loss(self, h, labels_onehot, summary=None):
        """``summary``: the ``similarity_rows`` of ``self(h)``, computed already (h is then
        not read)."""
        targets = labels_onehot if self.projection is None else self.projection(labels_onehot)
        if summary is not None:
            return sim_loss_of_rows(summary, targets, self.similarity_std)
        return sim_loss(self(h), targets, self.similarity_std)

    def input_similarity_loss(self, h, inputs):
        """The unsupervised sim term: MSE(S(head(h)), S(inputs)), inputs without gradient."""
        return sim_loss(self(h), ops.stop_gradient(inputs), self.similarity_std)

    def get_config(self):
        return {**super().get_config(), "dim_in_decoder": self.dim_in_decoder, "seed": self.seed,
                "projection": _serialize_projection(self.projection),
                "similarity_std": self.similarity_std}


@keras.saving.register_keras_serializable(package="keras_local")
class ReconstructionHead(keras.layers.Layer):
    """The reference's ``decoder_x``: h -> Dense(input width) (dense blocks) or
    Conv2DTranspose(input channels, same kernel, stride 1, 'same') (conv blocks), with
    bias, then the block's nonlinearity. Loss: MSE(reconstruction, block input), the
    input without gradient. PyTorch's default init (ConvTranspose2d's fan-in is
    input channels x kernel area, which Keras's VarianceScaling computes alike).
    """

    def __init__(self, kernel_size=3, strides=1, nonlin="relu", seed=None, bias_seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        if strides != 1:
            raise ValueError(f"the recon term needs stride-1 encoders, got strides={strides}")
        self.kernel_size = kernel_size
        self.nonlin = nonlin
        self.seed = seed
        self.bias_seed = bias_seed
        self.decoder = None

    def build(self, input_shape, target_shape):
        """``input_shape``: h's shape; ``target_shape``: the block input's shape."""
        channels = target_shape[-1]
        common = dict(kernel_initializer=torch_kernel_initializer(self.seed),
                      dtype=self.dtype_policy, name="decoder")
        if len(input_shape) == 4:
            self.decoder = keras.layers.Conv2DTranspose(
                channels, self.kernel_size, padding="same",
                bias_initializer=torch_bias_initializer(channels * self.kernel_size**2,
                                                        self.bias_seed), **common)
        else:
            self.decoder = keras.layers.Dense(
                channels, bias_initializer=torch_bias_initializer(input_shape[-1],
                                                                  self.bias_seed), **common)
        self.decoder.build(input_shape)

    def call(self, h):
        reconstruction = self.decoder(h)
        if self.nonlin == "leakyrelu":
            return ops.leaky_relu(reconstruction, negative_slope=0.01)
        return ops.relu(reconstruction)

    def loss(self, h, inputs):
        reconstruction = ops.cast(self(h), "float32")
        return ops.mean(ops.square(reconstruction - ops.stop_gradient(ops.cast(inputs, "float32"))))

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "nonlin": self.nonlin,
                "seed": self.seed, "bias_seed": self.bias_seed}


def _serialize_projection(projection):
    """A head's label projection (bio) as a nested config; the block shares one instance
    between its heads, a head rebuilt from its config alone gets its own."""
    return None if projection is None else keras.saving.serialize_keras_object(projection)


def _deserialize_projection(projection):
    if projection is None or isinstance(projection, keras.layers.Layer):
        return projection
    return keras.saving.deserialize_keras_object(projection)
