"""Dropout whose mask comes from TensorFlow's Threefry generator inside XLA."""

import keras


@keras.saving.register_keras_serializable(package="keras_local")
class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` (same seed stream, same scaling) whose mask, when traced
    for XLA on the TensorFlow backend, is drawn with ``rng_alg="threefry"``.

    Keras draws it with TensorFlow's default stateless algorithm, Philox, which XLA:CPU
    expands into slow scalar code: 1.7 ms per 128x1024 mask on a 2-core AVX2 machine
    against 0.57 ms for Threefry, about 5 ms of a 60 ms mlp 3x1024 predsim step
    (benchmarks/throughput.py). TensorFlow's own CPU kernel has no Threefry, so outside
    XLA (and on the other backends) this is Keras's Dropout. Both are counter-based
    generators of TensorFlow's stateless random API: the masks' bits differ between the
    two paths, not their distribution.
    """

    def call(self, inputs, training=False):
        if not (training and self.rate > 0 and self.noise_shape is None and _in_xla()):
            return super().call(inputs, training=training)
        import tensorflow as tf

        seed = self.seed_generator.next()
        # The seed state is int64; TensorFlow's stateless ops under XLA need int32 (the
        # reduction keras.random applies too).
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        return tf.nn.experimental.stateless_dropout(
            inputs, rate=self.rate, seed=seed, rng_alg="threefry")


def _in_xla():
    """True while a TensorFlow function is being traced for XLA (jit_compile=True)."""
    if keras.backend.backend() != "tensorflow":
        return False
    try:  # TensorFlow has no public test for this; without it, Keras's Philox path
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())
