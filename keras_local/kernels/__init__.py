"""Fast paths: backend kernels that train a piece of the method faster, or holding fewer
full-size maps, than its ``keras.ops`` expression, with the same values and gradients.

Layers, losses and optimisers write the method once in ``keras.ops``; at each place where
a backend may replace it they ask ``fast_paths()``, whose methods return None where the
portable expression is to be used. Which replacement applies, and under which conditions,
is decided in one place per backend: ``keras_local.kernels.tensorflow.TensorFlowPaths``
(the only backend with replacements). Nothing else in the package tests for TensorFlow.
"""

import keras


class PortablePaths:
    """No replacement: every caller runs its ``keras.ops`` expression (JAX, torch)."""

    def block_forward(self, block, inputs):
        """(h, head summaries) of a conv LocalBlock in training mode, or None."""
        return None

    def batch_norm_leaky_relu(self, bn, inputs, negative_slope):
        """(LeakyReLU(BatchNorm(inputs)), batch mean, biased batch variance), or None."""
        return None

    def batch_norm(self, bn, inputs):
        """(BatchNorm(inputs) in training mode, batch mean, biased batch variance), or None."""
        return None

    def moments(self, bn, inputs):
        """(batch mean, biased batch variance) over every axis but ``bn.axis``, or None."""
        return None

    def leaky_relu(self, x, negative_slope):
        """LeakyReLU(x) for training, or None."""
        return None

    def dropout(self, layer, inputs):
        """The training output of the Dropout ``layer`` (rate > 0, no noise shape), or None."""
        return None

    def spatial_std(self, flat):
        """Per-channel std over the positions of (B, positions, C) (ddof=1), or None."""
        return None

    def fused_updates(self, *variables):
        """(the fused update kernels, the backend variables behind ``variables``), or None."""
        return None


PORTABLE = PortablePaths()


def fast_paths():
    """The fast paths of the active Keras backend."""
    if keras.backend.backend() == "tensorflow":
        from keras_local.kernels.tensorflow import TENSORFLOW

        return TENSORFLOW
    return PORTABLE
