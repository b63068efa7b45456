"""Winograd F(2x2, 3x3) convolutions (keras_local.kernels.tensorflow.winograd) against TensorFlow's direct
convolution and its autodiff filter gradient."""

import numpy as np
import pytest
import tensorflow as tf

from keras_local.kernels.tensorflow import winograd as tf_winograd

pytestmark = pytest.mark.tensorflow_only


def direct_and_gradient(x, kernel, dy):
    with tf.GradientTape() as tape:
        tape.watch(kernel)
        y = tf.nn.conv2d(x, kernel, 1, "SAME")
    return y.numpy(), tape.gradient(y, kernel, output_gradients=dy).numpy()


def check(x, kernel, dy, conv, filter_gradient):
    expected_y, expected_grad = direct_and_gradient(x, kernel, dy)
    got_y, got_grad = conv(x, kernel).numpy(), filter_gradient(x, dy).numpy()
    assert got_y.shape == expected_y.shape and got_grad.shape == expected_grad.shape
    np.testing.assert_allclose(got_y, expected_y, rtol=0,
                               atol=1e-5 * np.max(np.abs(expected_y)))
    np.testing.assert_allclose(got_grad, expected_grad, rtol=0,
                               atol=1e-5 * np.max(np.abs(expected_grad)))


@pytest.mark.parametrize("batch,height,width,channels,out_channels", [
    (3, 8, 6, 4, 5),  # even maps
    (2, 7, 5, 3, 6),  # odd maps: the last tiles overhang
    (1, 2, 2, 2, 2),  # one tile
])
def test_matches_the_direct_convolution(batch, height, width, channels, out_channels, rng):
    x = tf.constant(rng.normal(size=(batch, height, width, channels)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 3, channels, out_channels)), tf.float32)
    dy = tf.constant(rng.normal(size=(batch, height, width, out_channels)), tf.float32)
    check(x, kernel, dy, tf_winograd.conv, tf_winograd.filter_gradient)


def test_groups_and_an_unknown_batch(rng, monkeypatch):
    """A batch of 7 in groups of 2 (the last one short), traced with the batch unknown."""
    height, width, channels = 6, 4, 3
    per_example = 16 * (height // 2) * (width // 2) * channels * 4
    monkeypatch.setattr(tf_winograd, "GROUP_BYTES", 2 * per_example)
    assert tf_winograd._group_size(tf.zeros((7, height, width, channels)), channels) == 2
    x = tf.constant(rng.normal(size=(7, height, width, channels)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 3, channels, channels)), tf.float32)
    dy = tf.constant(rng.normal(size=(7, height, width, channels)), tf.float32)
    maps = tf.TensorSpec((None, height, width, channels))
    conv = tf.function(tf_winograd.conv, input_signature=[maps, tf.TensorSpec(kernel.shape)])
    filter_gradient = tf.function(tf_winograd.filter_gradient, input_signature=[maps, maps])
    check(x, kernel, dy, conv, filter_gradient)


@pytest.mark.parametrize("input_shape,kernel_shape,expected", [
    ((16, 28, 28, 128), (3, 3, 128, 256), True),
    ((None, 14, 14, 512), (3, 3, 512, 512), True),
    ((16, 7, 7, 512), (3, 3, 512, 512), False),  # odd maps
    ((16, 12, 12, 512), (3, 3, 512, 512), False),  # small maps
    ((16, 28, 28, 1), (3, 3, 1, 128), False),  # few channels
    ((16, 28, 28, 128), (5, 5, 128, 128), False),  # not 3x3
])
def test_pays(input_shape, kernel_shape, expected):
    assert tf_winograd.pays(input_shape, kernel_shape) == expected
    with tf_winograd.disabled():
        assert not tf_winograd.pays(input_shape, kernel_shape)
