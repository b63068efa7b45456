"""A conv block trained through keras_local.kernels.tensorflow.chunked_block (its backward pass in batch
chunks) against TensorFlow's autodiff of the plain layers: losses, gradients w.r.t. the
weights and the input, and BatchNorm's moving statistics."""

import numpy as np
import pytest
import tensorflow as tf

from keras_local.kernels.tensorflow import TENSORFLOW
from keras_local.kernels.tensorflow import chunked_block as tf_chunked_block
from keras_local.kernels.tensorflow import gradients as tf_gradients
from keras_local.kernels.tensorflow import winograd as tf_winograd
from keras_local.layers.block import LocalBlock

pytestmark = pytest.mark.tensorflow_only


def make_block(rng, loss="predsim", channels=12, gamma_near_zero=False, size=8,
               **options):
    options = {"nonlin": "leakyrelu", "dim_in_decoder": 64, "seed": 5, **options}
    block = LocalBlock("conv", channels, 4, local_loss=loss, **options)
    block.build((None, size, size, 3))
    # Weights away from their initial values (gamma 1, beta 0, zero pred head).
    for v in block.trainable_variables:
        v.assign(v + rng.normal(0, 0.2, size=v.shape).astype("float32"))
    if gamma_near_zero:  # these channels keep their BatchNorm input (tf_gradients)
        gamma = block.bn.gamma.numpy()
        gamma[:3] = [0.0, 1e-9, 1e-3]
        block.bn.gamma.assign(gamma)
    return block


def run_block(block, x, labels, output_weight):
    """Loss, and gradients w.r.t. the block's weights and input, of the block's local
    loss plus sum(h * output_weight) (a gradient arriving from above the block)."""

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = block(x, training=True, labels=labels, dropout=False)
            loss = block.losses[0] + tf.reduce_sum(h * output_weight)
        return loss, tape.gradient(loss, block.trainable_variables + [x])

    loss, grads = run(x)
    stats = [block.bn.moving_mean.numpy(), block.bn.moving_variance.numpy()]
    block.bn.moving_mean.assign(np.zeros(block.width, "float32"))
    block.bn.moving_variance.assign(np.ones(block.width, "float32"))
    return float(loss), [g.numpy() for g in grads], stats


def compare_with_autodiff(block, batch, rng, from_above=0.0, size=8):
    x = tf.constant(rng.normal(size=(batch, size, size, 3)).astype("float32"))
    labels = tf.one_hot(rng.integers(0, 4, batch), 4)
    output_weight = tf.constant(from_above * rng.normal(size=(1, size, size, block.width)),
                                dtype="float32")
    assert TENSORFLOW.chunks_block(block, x)
    chunked = run_block(block, x, labels, output_weight)
    with tf_gradients.plain_autodiff():
        assert not TENSORFLOW.chunks_block(block, x)
        plain = run_block(block, x, labels, output_weight)
    np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-6)
    names = [v.path for v in block.trainable_variables] + ["input"]
    kernel_scale = None
    for name, got, expected in zip(names, chunked[1], plain[1]):
        assert np.all(np.isfinite(got)), name
        scale = np.max(np.abs(expected))
        if name.endswith("encoder/kernel"):
            kernel_scale = scale
        if name.endswith("encoder/bias"):
            # BatchNorm removes the encoder bias: its gradient is 0 up to rounding
            # (~1e-8), compared on the scale of the kernel's.
            scale = kernel_scale
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * scale, err_msg=name)
    for got, expected in zip(chunked[2], plain[2]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["predsim", pytest.param("pred", marks=pytest.mark.slow),
                                  pytest.param("sim", marks=pytest.mark.slow)])
def test_chunked_gradients_match_autodiff(loss, rng):
    compare_with_autodiff(make_block(rng, loss), 11, rng)  # chunks 2,2,2,1,...


def test_chunked_gradients_with_a_gradient_from_above(rng):
    compare_with_autodiff(make_block(rng, use_bias=False), 9, rng,
                          from_above=0.5)


def test_chunked_gradients_with_kept_channels_and_empty_chunks(rng):
    """Batch 5 in 8 chunks: three are empty. Channels with gamma ~ 0 take
    x_hat from their kept BatchNorm input."""
    compare_with_autodiff(make_block(rng, gamma_near_zero=True), 5, rng)


def test_one_chunk_without_pooling(rng):
    """dim_in_decoder above the map's size: the pred head reads h itself."""
    block = make_block(rng, dim_in_decoder=4096)
    assert block.heads["pred"].pool.geometry[:2] == (1, 1)
    compare_with_autodiff(block, 6, rng)


def test_chunked_gradients_with_winograd_sim_convolutions(rng):
    """128 channels on 14x14 maps: the sim head's convolution, its input and filter
    gradients go through tf_winograd (the encoder's, with 3 input channels, do not)."""
    block = make_block(rng, channels=128, size=14, dim_in_decoder=2048)
    assert tf_winograd.pays((None, 14, 14, 128), block.heads["sim"].transform.kernel.shape)
    compare_with_autodiff(block, 5, rng, from_above=0.5, size=14)


@pytest.mark.parametrize("options", [
    {"nonlin": "relu"},  # x_hat cannot be rebuilt from ReLU's output
    {"batch_norm": False},
    {"strides": 2},
    {"bio": True},
    {"similarity_std": False},
    {"local_loss": "predsim", "unsup_loss": "unsup_sim", "alpha": 0.5},
])
def test_other_blocks_take_the_autodiff_path(options, rng):
    options = {"local_loss": "predsim", **options}
    loss = options.pop("local_loss")
    block = make_block(rng, loss, **options)
    assert not TENSORFLOW.chunks_block(block, tf.zeros((2, 8, 8, 3)))


@pytest.mark.parametrize("kernel_shape", [(3, 3, 5, 7), (5, 3, 4, 2), (2, 2, 3, 3), (1, 1, 6, 4)])
def test_conv_input_gradient_matches_tensorflows(kernel_shape, rng):
    """Odd kernels take the turned-kernel forward convolution, even ones TensorFlow's
    backward-input op; both must equal the gradient TensorFlow computes."""
    kernel = tf.constant(rng.normal(size=kernel_shape).astype("float32"))
    x = tf.constant(rng.normal(size=(3, 7, 6, kernel_shape[2])).astype("float32"))
    dy = tf.constant(rng.normal(size=(3, 7, 6, kernel_shape[3])).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.nn.conv2d(x, kernel, 1, "SAME")
    expected = tape.gradient(y, x, output_gradients=dy).numpy()
    got = tf_chunked_block.conv_input_gradient(kernel)(x, dy).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.max(np.abs(expected)))


def test_conv_of_an_empty_chunk_has_the_kernel_output_channels(rng):
    """A chunk past a small batch's end is empty; its convolution must still have the
    kernel's output channels so the chunks concatenate (oneDNN's AVX-512 kernels return
    the input's channel count for an empty batch)."""
    kernel = tf.constant(rng.normal(size=(3, 3, 12, 3)).astype("float32"))
    full = tf.constant(rng.normal(size=(2, 8, 8, 12)).astype("float32"))

    @tf.function
    def chunks_concatenated(x):
        return tf.concat([tf_chunked_block.conv(x[:2], kernel),
                          tf_chunked_block.conv(x[2:], kernel)], axis=0)

    assert tf_chunked_block.conv(full[2:], kernel).shape == (0, 8, 8, 3)
    np.testing.assert_allclose(chunks_concatenated(full).numpy(),
                               tf.nn.conv2d(full, kernel, 1, "SAME").numpy(),
                               rtol=1e-5, atol=1e-5)


def pretend_a_gpu(monkeypatch):
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["/physical_device:GPU:0"] if kind == "GPU"
                        else real(kind))


def test_with_a_gpu_present_the_block_takes_autodiff(rng, monkeypatch):
    """The chunked pass was measured on CPUs only."""
    block, x = make_block(rng), tf.zeros((4, 8, 8, 3))
    assert TENSORFLOW.chunks_block(block, x)
    pretend_a_gpu(monkeypatch)
    assert not TENSORFLOW.chunks_block(block, x)
