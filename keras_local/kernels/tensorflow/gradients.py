"""TensorFlow custom gradients that keep fewer full-size maps alive during training.

Same values and gradients as TensorFlow's autodiff of the plain expressions (to float32
rounding; tests/test_tf_gradients.py), but the backward pass reads fewer saved tensors:

- ``spatial_std``: autodiff keeps the centred map x - mean for the gradient of the
  square; here only x is kept (the sim head's conv output, which exists anyway until the
  std is computed) and the centred map is rebuilt in the backward pass. The forward pass
  also makes one full-size temporary (squared difference) instead of two.
- ``batch_norm_leaky_relu``: training-mode BatchNorm followed by LeakyReLU whose gradient
  reads only the output h, not the BatchNorm input: LeakyReLU (0 < slope < 1) is
  invertible, and the normalised value is x_hat = (y - beta) / gamma (the "in-place
  activated BatchNorm" idea). Channels where gamma is too small next to beta for that
  division to be accurate keep their BatchNorm input instead (usually none).

- ``batch_norm``: training-mode BatchNorm with ``moments``' statistics, normalised by
  FusedBatchNormV3 in inference mode (one pass), and the training-mode gradient.

``moments`` and ``channel_sum`` are BatchNorm's reductions, summed a few terms at a time
(see ``channel_sum``): TensorFlow's fused kernel and ``tf.nn.moments`` accumulate the
batch mean in one float32 running sum per channel, 3.9e-5 relative off float64 on a
32x28x28x128 conv output, where PyTorch is at ~1e-7; through BatchNorm's backward pass
that reached 1e-3..1e-1 in some gradients.

Every full-size map that the backward passes compute from forward tensors alone has a
control edge to the incoming gradient: TensorFlow's executor runs an op as soon as its
inputs exist, which would otherwise be during the forward pass (the map then stays alive
until the backward pass reaches its consumer).

Which of them applies where is decided by ``keras_local.kernels.tensorflow.TensorFlowPaths``;
most only outside XLA (``active()``: under XLA the compiler plans buffers itself).
"""

import contextlib
import contextvars

import keras

# x_hat = (y - beta) / gamma loses about |beta / gamma| ulps of y to rounding; channels
# with |gamma| <= GAMMA_BETA_RATIO * |beta| (or |gamma| <= GAMMA_FLOOR) keep their
# BatchNorm input instead (an error of at most ~10 ulps, like autodiff's own).
GAMMA_BETA_RATIO = 0.1
GAMMA_FLOOR = 1e-6

_PLAIN_AUTODIFF = contextvars.ContextVar("keras_local_plain_autodiff", default=False)


@contextlib.contextmanager
def plain_autodiff():
    """Within this block every caller takes the plain autodiff path (for comparing the
    two; a function traced here keeps that path when it runs later)."""
    token = _PLAIN_AUTODIFF.set(True)
    try:
        yield
    finally:
        _PLAIN_AUTODIFF.reset(token)


def active():
    """Whether callers should use these gradients now: the TensorFlow backend, outside
    ``plain_autodiff()``, and not while tracing a function that XLA will compile
    (jit_compile=True)."""
    if _PLAIN_AUTODIFF.get() or keras.backend.backend() != "tensorflow":
        return False
    return not in_xla()


def in_xla():
    """True while a TensorFlow function is being traced for XLA (jit_compile=True).
    TensorFlow has no public test for this."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


# channel_sum adds the batch axis in groups of this many rows (zero rows pad the last).
BATCH_GROUP = 16


def channel_sum(t):
    """Sum of ``t`` over all axes but the last, each partial sum short: the innermost
    reduced axis first (one row of a feature map), then the next, then the batch in
    groups of BATCH_GROUP. A float32 sum of n terms of one sign is off by up to ~n ulps
    of the result; summed this way n is at most an axis length, not batch x height x
    width. Only the first reduction reads the full map."""
    import tensorflow as tf

    for axis in range(len(t.shape) - 2, 0, -1):
        t = tf.reduce_sum(t, axis)
    batch = tf.shape(t)[0]
    t = tf.pad(t, [[0, (-batch) % BATCH_GROUP], [0, 0]])
    t = tf.reduce_sum(tf.reshape(t, [-1, BATCH_GROUP, tf.shape(t)[-1]]), 1)
    return tf.reduce_sum(t, 0)


def moments(z):
    """(mean, biased variance) of ``z`` over all axes but the last, both from
    ``channel_sum``; the variance is the mean squared distance from that mean (two
    passes: no cancellation when the mean is large next to the spread)."""
    import tensorflow as tf

    count = tf.cast(tf.size(z) // tf.shape(z)[-1], z.dtype)
    mean = channel_sum(z) / count
    return mean, channel_sum(tf.math.squared_difference(z, mean)) / count


def batch_norm(z, gamma, beta, epsilon):
    """BatchNorm of ``z`` (channels last) in training mode: (y, mean, biased variance),
    no gradient through the two statistics (they are for the moving averages).

    Same values and gradients as TensorFlow's fused training kernel, with ``moments``'
    statistics and ``channel_sum``'s reductions in the gradient. The forward pass is
    FusedBatchNormV3 in inference mode given those statistics (one pass over the map);
    the backward pass keeps z, as the fused kernel's does."""
    import tensorflow as tf

    stats = {}

    @tf.custom_gradient
    def forward(z, gamma, beta):
        mean, variance = moments(z)
        stats["mean"], stats["variance"] = mean, variance
        if len(z.shape) == 4:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                z, gamma, beta, mean=mean, variance=variance, epsilon=epsilon,
                data_format="NHWC", is_training=False)
        else:
            y = tf.nn.batch_normalization(z, mean, variance, beta, gamma, epsilon)
        count = tf.cast(tf.size(z) // tf.size(gamma), z.dtype)

        def gradient(dy):
            rsqrt = tf.math.rsqrt(variance + epsilon)
            with tf.control_dependencies([dy]):
                x_hat = (z - mean) * rsqrt
            return batch_norm_gradients(dy, x_hat, gamma, rsqrt, count)

        return y, gradient

    y = forward(z, gamma, beta)
    return y, tf.stop_gradient(stats["mean"]), tf.stop_gradient(stats["variance"])


def batch_norm_gradients(dy, x_hat, gamma, rsqrt, count):
    """(dz, dgamma, dbeta) of training-mode BatchNorm given the output gradient ``dy``,
    the normalised input ``x_hat``, 1 / sqrt(variance + epsilon) and the values per
    channel; the two reductions by ``channel_sum``."""
    dbeta = channel_sum(dy)
    dgamma = channel_sum(dy * x_hat)
    dz = (gamma * rsqrt) * (dy - dbeta / count - x_hat * (dgamma / count))
    return dz, dgamma, dbeta


def spatial_std(flat):
    """Per-channel std over axis 1 (ddof=1) of ``flat`` (B, positions, C) -> (B, C); a
    channel that is constant gets std 0 and gradient 0."""
    import tensorflow as tf

    @tf.custom_gradient
    def std_over_positions(flat):
        std, mean = std_forward(flat)

        def gradient(dstd):
            with tf.control_dependencies([dstd]):  # not before the backward pass gets here
                return std_gradient(flat, mean, std, dstd)

        return std, gradient

    return std_over_positions(flat)


def std_forward(flat):
    """(std, mean over axis 1) of ``spatial_std``'s input (no custom gradient)."""
    import tensorflow as tf

    positions = flat.shape[1]
    mean = tf.reduce_mean(flat, axis=1, keepdims=True)
    variance = tf.reduce_sum(tf.math.squared_difference(flat, mean), axis=1) / (positions - 1)
    positive = variance > 0
    std = tf.where(positive, tf.sqrt(tf.where(positive, variance, tf.ones_like(variance))),
                   tf.zeros_like(variance))
    return std, mean


def std_gradient(flat, mean, std, dstd):
    """The gradient of ``std_forward``'s std for ``flat`` given its outputs and the std's
    gradient: (x - mean) / ((positions - 1) * std), 0 where std is 0."""
    import tensorflow as tf

    positions = flat.shape[1]
    positive = std > 0
    scale = tf.where(positive, dstd / (tf.where(positive, std, tf.ones_like(std))
                                       * (positions - 1)), tf.zeros_like(std))
    return (flat - mean) * scale[:, None, :]


def batch_norm_leaky_relu(z, gamma, beta, epsilon, slope):
    """LeakyReLU(BatchNorm(z)) in training mode over all axes but the last.

    Returns (h, mean, variance): mean and the biased variance of the batch (for the
    moving statistics; no gradient flows through them), from ``moments``. The forward
    ops are then those of ``tf.nn.batch_normalization`` and ``tf.nn.leaky_relu``, so h is
    bitwise what TorchBatchNormalization's composed path + LeakyReLU give.
    """
    import tensorflow as tf

    if not 0.0 < slope < 1.0:
        raise ValueError(f"batch_norm_leaky_relu needs 0 < slope < 1, got {slope}")
    stats = {}

    @tf.custom_gradient
    def forward(z, gamma, beta):
        mean, variance = moments(z)
        y = tf.nn.batch_normalization(z, mean, variance, beta, gamma, epsilon)
        h = tf.nn.leaky_relu(y, alpha=slope)
        stats["mean"], stats["variance"] = mean, variance
        kept = kept_channels(gamma, beta)
        kept_z = tf.gather(z, kept, axis=-1)  # (..., 0) in the usual case: no memory
        count = tf.cast(tf.size(z) // tf.size(gamma), z.dtype)

        def gradient(dh):
            dy = tf.raw_ops.LeakyReluGrad(gradients=dh, features=h, alpha=slope)
            rsqrt = tf.math.rsqrt(variance + epsilon)
            # x_hat depends only on forward tensors: without the control edge TensorFlow
            # computes it as soon as h exists, and the map lives through the whole forward
            # pass of the heads.
            with tf.control_dependencies([dy]):
                x_hat = x_hat_from_output(h, slope, gamma, beta, kept, kept_z, mean, rsqrt)
            return batch_norm_gradients(dy, x_hat, gamma, rsqrt, count)

        return h, gradient

    h = forward(z, gamma, beta)
    return h, tf.stop_gradient(stats["mean"]), tf.stop_gradient(stats["variance"])


def kept_channels(gamma, beta):
    """Indices of the channels whose x_hat cannot be rebuilt accurately from the output
    (``x_hat_from_output``); they keep their BatchNorm input instead."""
    import tensorflow as tf

    exact = (tf.abs(gamma) > GAMMA_BETA_RATIO * tf.abs(beta)) & (tf.abs(gamma) > GAMMA_FLOOR)
    return tf.cast(tf.reshape(tf.where(tf.logical_not(exact)), [-1]), tf.int32)


def x_hat_from_output(h, slope, gamma, beta, kept, kept_z, mean, rsqrt):
    """BatchNorm's normalised input x_hat, rebuilt from h = LeakyReLU(gamma x_hat + beta):
    LeakyReLU's inverse is min(h, h / slope) for 0 < slope < 1. The ``kept`` channels
    (``kept_channels``) come from their BatchNorm input ``kept_z`` (h's shape, those
    channels only) instead."""
    import tensorflow as tf

    x_hat = (tf.minimum(h, h / slope) - beta) / gamma

    def with_kept_channels():
        kept_x_hat = (kept_z - tf.gather(mean, kept)) * tf.gather(rsqrt, kept)
        channels = tf.size(gamma)
        source = tf.tensor_scatter_nd_update(
            tf.range(channels), kept[:, None],
            channels + tf.range(tf.size(kept), dtype=kept.dtype))
        return tf.gather(tf.concat([x_hat, kept_x_hat], axis=-1), source, axis=-1)

    return tf.cond(tf.size(kept) > 0, with_kept_channels, lambda: x_hat)


def leaky_relu_with_output_gradient(x, slope):
    """LeakyReLU whose gradient reads its output, not its input (TensorFlow).

    TensorFlow's LeakyReluGrad reads the op's input (here the BatchNorm output), so
    training kept that map alive next to h; for a positive slope the output has the
    input's sign, so the same kernel given the output computes the same gradient and
    the BatchNorm output is freed once h exists (one feature map less per block).
    """
    import tensorflow as tf

    @tf.custom_gradient
    def leaky_relu(x):
        y = tf.nn.leaky_relu(x, alpha=slope)

        def gradient(dy):
            return tf.raw_ops.LeakyReluGrad(gradients=dy, features=y, alpha=slope)

        return y, gradient

    return leaky_relu(x)
