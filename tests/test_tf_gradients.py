"""The memory-saving custom gradients (keras_local.kernels.tensorflow.gradients) against TensorFlow's
autodiff of the plain expressions: values and gradients w.r.t. inputs and weights."""

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_local as kl
from keras_local.kernels.tensorflow import TENSORFLOW
from keras_local.kernels.tensorflow import gradients as tf_gradients
from keras_local.layers.block import LocalBlock
from keras_local.losses.maths import spatial_std
from keras_local.steps import rule
from keras_local.steps.tensorflow import TensorFlowExecutor

pytestmark = pytest.mark.tensorflow_only

SLOPE = 0.01
EPSILON = 1e-5


@pytest.fixture
def plain_gradients():
    """``plain_gradients(fn, *args)``: ``fn(*args)`` with tf_gradients off."""

    def run(fn, *args):
        with tf_gradients.plain_autodiff():
            return fn(*args)

    return run


def assert_close(actual, expected, rtol=1e-5, err_msg="", scale=None):
    """Relative to the largest entry (or ``scale``): entries that autodiff gets as a
    difference of large terms are only that accurate in either path."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected)) if scale is None else scale
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=err_msg)


def value_and_gradients(fn, *args):
    """fn(*args) and d sum(fn(*args) * weights) / d args, traced as in training."""
    args = [tf.constant(a) for a in args]

    @tf.function
    def run(*args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            out = fn(*args)
            weights = tf.cos(tf.range(tf.size(out), dtype=out.dtype))
            loss = tf.reduce_sum(tf.reshape(out, [-1]) * weights)
        return out, tape.gradient(loss, args)

    out, grads = run(*args)
    return out.numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("shape", [(4, 5, 5, 6), (3, 8, 8, 16)])
def test_spatial_std_matches_autodiff(shape, rng, plain_gradients):
    x = rng.normal(1.0, 2.0, size=shape).astype("float32")
    x[0, :, :, 1] = 3.0  # a constant channel: std 0, gradient 0
    new, new_grads = value_and_gradients(spatial_std, x)
    old, old_grads = plain_gradients(value_and_gradients, spatial_std, x)
    assert_close(new, old, rtol=1e-6)
    assert_close(new_grads[0], old_grads[0])
    np.testing.assert_array_equal(new_grads[0][0, :, :, 1], 0.0)


def plain_batch_norm_leaky_relu(z, gamma, beta):
    mean, variance = tf_gradients.moments(z)  # autodiff through the statistics
    return tf.nn.leaky_relu(tf.nn.batch_normalization(z, mean, variance, beta, gamma, EPSILON),
                            alpha=SLOPE)


def fused_batch_norm_leaky_relu(z, gamma, beta):
    return tf_gradients.batch_norm_leaky_relu(z, gamma, beta, EPSILON, SLOPE)[0]


GAMMA_CASES = {
    "ordinary": lambda rng, c: (rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)),
    "negative_gamma": lambda rng, c: (-rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)),
    # gamma 0, 1e-9, and small next to beta: those channels keep their BatchNorm input;
    # the fifth is rebuilt from h at the smallest |gamma / beta| that allows
    "gamma_near_zero": lambda rng, c: (
        np.concatenate([[0.0, 1e-9, 1e-3, -0.02, 0.031], rng.uniform(0.5, 1.5, c - 5)]),
        np.concatenate([[0.3, 0.0, 0.5, 1.0, -0.3], rng.uniform(-0.5, 0.5, c - 5)])),
}


@pytest.mark.parametrize("case", list(GAMMA_CASES))
@pytest.mark.parametrize("shape", [(8, 6, 6, 8), (32, 12)])
def test_batch_norm_leaky_relu_matches_autodiff(case, shape, rng):
    z = rng.normal(0.7, 1.8, size=shape).astype("float32")
    gamma, beta = (v.astype("float32") for v in GAMMA_CASES[case](rng, shape[-1]))
    new, new_grads = value_and_gradients(fused_batch_norm_leaky_relu, z, gamma, beta)
    old, old_grads = value_and_gradients(plain_batch_norm_leaky_relu, z, gamma, beta)
    np.testing.assert_array_equal(new, old)  # the same forward ops
    for got, expected in zip(new_grads, old_grads):
        assert np.all(np.isfinite(got))
        assert_close(got, expected)
    if case == "gamma_near_zero":  # the small channels' gradients, on their own scale
        for channel in range(1, 5):
            for got, expected in zip(new_grads, old_grads):
                assert_close(got[..., channel], expected[..., channel])


def test_batch_norm_leaky_relu_returns_the_batch_moments(rng):
    z = rng.normal(size=(16, 4, 4, 5)).astype("float32")
    _, mean, variance = tf_gradients.batch_norm_leaky_relu(
        tf.constant(z), tf.ones(5), tf.zeros(5), EPSILON, SLOPE)
    np.testing.assert_allclose(mean, z.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, z.var(axis=(0, 1, 2)), rtol=1e-5)


def block_step(block, x, labels):
    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            block(x, training=True, labels=labels, dropout=False)
            loss = block.losses[0]
        return loss, tape.gradient(loss, block.trainable_variables)

    loss, grads = run(x)
    return float(loss), [g.numpy() for g in grads]


@pytest.mark.parametrize("kind,shape", [("conv", (16, 8, 8, 3)), ("dense", (16, 20))])
def test_block_local_loss_gradients_match_autodiff(kind, shape, rng, plain_gradients):
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    labels = tf.one_hot(rng.integers(0, 4, shape[0]), 4)
    block = LocalBlock(kind, 12, 4, nonlin="leakyrelu", dim_in_decoder=64, seed=5)
    block.build(shape)
    # Weights away from their initial values (gamma 1, beta 0, zero pred head).
    for v in block.trainable_variables:
        v.assign(v + rng.normal(0, 0.2, size=v.shape).astype("float32"))
    assert TENSORFLOW.fuses_leaky_relu(block.bn, x)
    new_loss, new_grads = block_step(block, x, labels)
    new_stats = [block.bn.moving_mean.numpy(), block.bn.moving_variance.numpy()]
    block.bn.moving_mean.assign(np.zeros(12, "float32"))
    block.bn.moving_variance.assign(np.ones(12, "float32"))
    old_loss, old_grads = plain_gradients(block_step, block, x, labels)
    old_stats = [block.bn.moving_mean.numpy(), block.bn.moving_variance.numpy()]
    np.testing.assert_allclose(new_loss, old_loss, rtol=1e-6)
    kernel_scale = None
    for variable, got, expected in zip(block.trainable_variables, new_grads, old_grads):
        if variable is block.encoder.kernel:
            kernel_scale = np.max(np.abs(expected))
        # BatchNorm removes the encoder bias: its gradient is 0 up to rounding (~1e-8),
        # compared on the scale of the kernel's.
        scale = kernel_scale if variable is block.encoder.bias else None
        assert_close(got, expected, err_msg=variable.path, scale=scale)
    for got, expected in zip(new_stats, old_stats):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def train(name, shape, steps=3):
    config = kl.Config(num_layers=1, num_hidden=16, dropout=0.1, feat_mult=1 / 32,
                       nonlin="leakyrelu", jit_compile=False)
    keras.utils.set_random_seed(3)
    model = kl.build_model(name, shape, 4, config)
    # SGD: Adam would turn the encoder biases' gradients, 0 up to rounding in either path
    # (BatchNorm removes the bias), into full +-lr steps of random sign.
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9))
    model.optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        inputs, onehot = rule.split_batch(model, (x, y))
        return rule.train(model, TensorFlowExecutor(model), inputs, onehot)

    rng = np.random.default_rng(0)
    for _ in range(steps):
        step(rng.normal(size=(16,) + shape).astype("float32"), rng.integers(0, 4, 16))
    return [v.numpy() for v in model.weights]


@pytest.mark.parametrize("name,shape", [("vgg6a", (8, 8, 3)), ("mlp", (6, 6, 1))])
def test_training_gives_the_weights_of_plain_autodiff(name, shape, plain_gradients):
    new = train(name, shape)
    old = plain_gradients(train, name, shape)
    for got, expected in zip(new, old):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_xla_traces_take_the_plain_path():
    @tf.function(jit_compile=True)
    def inside():
        return tf.constant(tf_gradients.active())

    assert tf_gradients.active()
    assert not inside().numpy()


def test_plain_autodiff_turns_the_custom_gradients_off_inside_its_block_only():
    assert tf_gradients.active()
    with tf_gradients.plain_autodiff():
        assert not tf_gradients.active()
    assert tf_gradients.active()
