"""Dropout whose mask may come from a backend's faster generator (``keras_local.kernels``)."""

import keras

from keras_local.kernels import fast_paths


@keras.saving.register_keras_serializable(package="keras_local")
class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` (same seed stream, same scaling) whose mask, where a fast
    path applies (TensorFlow under XLA: Threefry instead of Philox, see
    ``keras_local.kernels.tensorflow.TensorFlowPaths.dropout``), comes from that path. The
    masks' bits then differ from Keras's, not their distribution."""

    def call(self, inputs, training=False):
        if training and self.rate > 0 and self.noise_shape is None:
            fast = fast_paths().dropout(self, inputs)
            if fast is not None:
                return fast
        return super().call(inputs, training=training)
