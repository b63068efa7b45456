"""TorchBatchNormalization: PyTorch's unbiased moving variance, Keras's everything else."""

import keras
import numpy as np
import pytest

import keras_local as kl
from keras_local.layers.batch_norm import TorchBatchNormalization

from helpers import to_numpy


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 2)])
def test_moving_variance_is_the_unbiased_batch_variance(rng, shape):
    x = rng.normal(loc=0.5, scale=2.0, size=shape).astype("float32")
    axes = tuple(range(len(shape) - 1))  # N = batch x spatial positions
    layer = TorchBatchNormalization(momentum=0.0, epsilon=1e-5)
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(to_numpy(layer.moving_variance),
                               x.var(axis=axes, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.moving_mean),
                               x.mean(axis=axes), rtol=1e-5, atol=1e-6)
    # The batch is normalised with the biased variance, as in both frameworks.
    biased = (x - x.mean(axis=axes)) / np.sqrt(x.var(axis=axes) + 1e-5)
    np.testing.assert_allclose(out, biased, rtol=1e-4, atol=1e-5)


def test_moving_variance_with_momentum_follows_pytorch(rng):
    """torch: running_var = (1 - 0.1) running_var + 0.1 * unbiased (Keras momentum 0.9)."""
    layer = TorchBatchNormalization(momentum=0.9)
    batches = [rng.normal(size=(6, 2, 2, 3)).astype("float32") for _ in range(3)]
    running_var = np.ones(3)
    for x in batches:
        layer(x, training=True)
        running_var = 0.9 * running_var + 0.1 * x.var(axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(to_numpy(layer.moving_variance), running_var,
                               rtol=1e-5)
    plain = keras.layers.BatchNormalization(momentum=0.9)
    for x in batches:
        plain(x, training=True)
    assert not np.allclose(to_numpy(plain.moving_variance), running_var,
                           rtol=1e-3)


def test_blocks_use_it_and_models_save_and_load(tmp_path, rng):
    config = kl.Config(num_layers=1, num_hidden=8, feat_mult=1 / 32, dim_in_decoder=32)
    model = kl.build_model("vgg6a", (8, 8, 3), 4, config)
    assert all(isinstance(block.bn, TorchBatchNormalization) for block in model.local_blocks)
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    model(x, training=True)  # moves the BatchNorm statistics
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.local_blocks[0].bn, TorchBatchNormalization)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), atol=1e-6)


@pytest.mark.tensorflow_only
def test_onnx_export_keeps_parity(tmp_path, rng):
    """The export's own ONNX-vs-Keras check (1e-4, same argmax) after BN statistics moved."""
    from keras_local.exporting import export_model

    config = kl.Config(dataset="fashion_mnist", num_layers=1, num_hidden=8,
                       feat_mult=1 / 32, dim_in_decoder=32, lr=1e-2)
    model = kl.build_model("vgg6a", (28, 28, 1), 10, config)
    for _ in range(3):  # moves the BatchNorm statistics
        model(rng.normal(size=(16, 28, 28, 1)).astype("float32"), training=True)
    metadata = export_model(model, tmp_path / "export", formats=("onnx",))
    assert metadata["parity_max_abs_diff"]["onnx"] <= 1e-4


@pytest.mark.parametrize("shape", [(6, 5, 5, 4), (1, 1, 1, 3)])
def test_fused_kernel_gives_the_composed_ops_values_and_gradients(rng, shape):
    """On TensorFlow, NHWC maps take FusedBatchNormV3: same outputs, statistics and
    gradients (inputs, gamma, beta) as the composed ops of the other backends."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the fused kernel is TensorFlow's")
    import tensorflow as tf

    x = tf.constant(rng.normal(loc=0.5, scale=2.0, size=shape).astype("float32"))
    layer = TorchBatchNormalization()
    layer.build(shape)
    layer.gamma.assign(rng.uniform(0.5, 1.5, size=shape[-1]))
    layer.beta.assign(rng.normal(size=shape[-1]))
    from keras_local.kernels.tensorflow import TENSORFLOW

    def fused(t):
        outputs, mean, variance = TENSORFLOW.batch_norm(layer, t)
        return outputs, mean, layer.unbiased(t, variance)

    def composed(t):
        mean, variance = layer.batch_moments(t)
        outputs = keras.ops.batch_normalization(t, mean, variance, axis=-1, offset=layer.beta,
                                                scale=layer.gamma, epsilon=layer.epsilon)
        return outputs, mean, layer.unbiased(t, variance)

    weights = tf.constant(rng.normal(size=shape).astype("float32"))
    results = []
    for path in (fused, composed):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs, mean, unbiased = path(x)
            loss = tf.reduce_sum(outputs * weights)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([outputs, mean, unbiased] + grads)
    for fused, composed in zip(*results):
        np.testing.assert_allclose(np.asarray(fused), np.asarray(composed), rtol=1e-4, atol=1e-5)


def _offset_map(rng, shape=(32, 28, 28, 128)):
    """A float32 map like a conv output whose channel means are large next to their
    spread (TensorFlow's fused kernel: ~2e-6 relative off float64 on it, up to 4e-5 on a
    real vgg8b block-1 output; PyTorch ~1e-7)."""
    offsets = rng.uniform(5.0, 500.0, size=shape[-1])
    return (rng.normal(size=shape) + offsets).astype("float32")


def _assert_float64_exact(mean, variance, x, what):
    axes = tuple(range(x.ndim - 1))
    exact = x.astype(np.float64)
    for got, want, name in ((mean, exact.mean(axis=axes), "mean"),
                            (variance, exact.var(axis=axes), "variance")):
        relative = np.abs(np.asarray(got, np.float64) - want) / np.abs(want)
        assert relative.max() <= 1e-6, f"{what}: batch {name} {relative.max():.1e} off float64"


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("path", ["fused", "unfused", "leaky_relu", "moments"])
def test_batch_statistics_are_as_precise_as_float64(rng, path):
    import tensorflow as tf

    from keras_local.kernels.tensorflow import TENSORFLOW
    from keras_local.kernels.tensorflow import gradients as tf_gradients

    x = _offset_map(rng)
    layer = TorchBatchNormalization(momentum=0.9, epsilon=1e-5)
    layer.build(x.shape)
    if path == "moments":
        mean, variance = tf_gradients.moments(tf.constant(x))
    elif path == "leaky_relu":
        _, mean, variance = tf_gradients.batch_norm_leaky_relu(
            tf.constant(x), tf.convert_to_tensor(layer.gamma), tf.convert_to_tensor(layer.beta),
            1e-5, 0.01)
    elif path == "fused":
        _, mean, variance = TENSORFLOW.batch_norm(layer, tf.constant(x))
    else:
        mean, variance = layer.batch_moments(tf.constant(x))
    _assert_float64_exact(mean, variance, x, path)


@pytest.mark.tensorflow_only
def test_dense_batch_statistics_are_as_precise_as_float64(rng):
    """Dense blocks' BatchNorm reduces over the batch only (here 300 rows: groups of 16)."""
    from keras_local.kernels.tensorflow import gradients as tf_gradients

    x = _offset_map(rng, (300, 64))
    _assert_float64_exact(*tf_gradients.moments(x), x, "dense")


@pytest.mark.tensorflow_only
def test_chunked_conv_block_batch_statistics_are_as_precise_as_float64(rng):
    """The chunked conv block's forward pass (moving statistics = 0.1 x batch statistics
    from zero / one)."""
    import tensorflow as tf

    from keras_local.kernels.tensorflow import TENSORFLOW
    from keras_local.kernels.tensorflow import chunked_block as tf_chunked_block
    from keras_local.layers.block import LocalBlock

    block = LocalBlock("conv", 16, 4, nonlin="leakyrelu", dim_in_decoder=64, seed=5)
    x = rng.normal(size=(32, 28, 28, 3)).astype("float32")
    block.build(x.shape)
    block.encoder.bias.assign(rng.uniform(5.0, 500.0, size=16).astype("float32"))
    assert TENSORFLOW.chunks_block(block, tf.constant(x))
    block.bn.moving_variance.assign(np.zeros(16, "float32"))
    tf_chunked_block.block_forward(block, tf.constant(x))
    z = keras.ops.convert_to_numpy(block.encoder(x))  # the same conv: 16 channels, no Winograd
    count = z.size // 16
    mean = block.bn.moving_mean.numpy().astype(np.float64) / 0.1
    variance = block.bn.moving_variance.numpy().astype(np.float64) / 0.1 * (count - 1) / count
    _assert_float64_exact(mean, variance, z, "chunked block")
