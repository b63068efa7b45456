"""TorchBatchNormalization: PyTorch's unbiased moving variance, Keras's everything else."""

import keras
import numpy as np
import pytest

import keras_local as kl
from keras_local.layers.batch_norm import TorchBatchNormalization


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 2)])
def test_moving_variance_is_the_unbiased_batch_variance(rng, shape):
    x = rng.normal(loc=0.5, scale=2.0, size=shape).astype("float32")
    axes = tuple(range(len(shape) - 1))  # N = batch x spatial positions
    layer = TorchBatchNormalization(momentum=0.0, epsilon=1e-5)
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_variance),
                               x.var(axis=axes, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_mean),
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
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_variance), running_var,
                               rtol=1e-5)
    plain = keras.layers.BatchNormalization(momentum=0.9)
    for x in batches:
        plain(x, training=True)
    assert not np.allclose(keras.ops.convert_to_numpy(plain.moving_variance), running_var,
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
    assert layer._fused_available(x)
    weights = tf.constant(rng.normal(size=shape).astype("float32"))
    results = []
    for path in (layer._fused_training, lambda t: layer._unfused_training(t, None)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs, mean, unbiased = path(x)
            loss = tf.reduce_sum(outputs * weights)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([outputs, mean, unbiased] + grads)
    for fused, composed in zip(*results):
        np.testing.assert_allclose(np.asarray(fused), np.asarray(composed), rtol=1e-4, atol=1e-5)
