import numpy as np
import keras
import tensorflow as tf

from keras_local.layers.dropout import Dropout


def xla_dropout(layer, x):
    return tf.function(lambda t: layer(t, training=True), jit_compile=True)(x).numpy()


def test_threefry_mask_rate_scaling_and_seed_stream():
    x = tf.ones((256, 512))
    layer = Dropout(0.25, seed=7)
    first, second = xla_dropout(layer, x), xla_dropout(layer, x)
    kept = first != 0
    assert abs(kept.mean() - 0.75) < 0.01  # 131,072 draws: 5 standard deviations is 0.006
    np.testing.assert_allclose(first[kept], 1 / 0.75, rtol=1e-6)
    assert (kept != (second != 0)).mean() > 0.3  # the seed stream advances per call
    np.testing.assert_array_equal(xla_dropout(Dropout(0.25, seed=7), x), first)
    # Outside XLA: Keras's own (Philox) mask from the same seed stream, same rate.
    graph = keras.ops.convert_to_numpy(Dropout(0.25, seed=7)(x, training=True))
    assert abs((graph != 0).mean() - 0.75) < 0.01 and (graph != first).any()


def test_inference_and_zero_rate_pass_through():
    x = np.arange(12, dtype="float32").reshape(3, 4)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(Dropout(0.5, seed=1)(x)), x)
    np.testing.assert_array_equal(xla_dropout(Dropout(0.0, seed=1), tf.constant(x)), x)
