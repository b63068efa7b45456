"""TensorFlow's fast paths, and the one place that decides when each applies.

- ``chunked_block``: a conv LocalBlock's training pass whose backward pass walks the batch
  in chunks (no full-size gradient map), its convolutions partly by ``winograd``;
- ``gradients``: custom gradients that keep fewer full-size maps alive (BatchNorm with
  LeakyReLU, the spatial std of the sim head), and BatchNorm statistics summed a few terms
  at a time (float32 precision close to float64);
- ``fused_updates``: one kernel per variable for the optimisers' updates.

Which of them a run uses:

| path | used when |
| --- | --- |
| chunked block | training a conv block (3x3 'same', stride 1, BatchNorm, LeakyReLU, pred/sim heads, not bio, no unsupervised term) outside XLA, on CPUs only |
| BatchNorm + LeakyReLU gradient | training, outside XLA, float32, BatchNorm with scale and centre over the last axis |
| BatchNorm statistics | training a 4-D map (fused) or any map normalised over its last axis |
| LeakyReLU gradient from its output | training with LeakyReLU |
| spatial std gradient | outside XLA |
| fused optimiser updates | no tf.distribute strategy, CPUs only |
| Threefry dropout masks | inside XLA |

Under XLA the compiler plans buffers itself, so the paths that only save memory step
aside. Inside XLA, dropout masks are drawn with Threefry rather than Keras's Philox, which
XLA:CPU expands into slow scalar code (1.7 ms per 128x1024 mask on a 2-core AVX2 machine
against 0.57 ms, about 5 ms of a 60 ms mlp 3x1024 predsim step); TensorFlow's own CPU
kernel has no Threefry, so outside XLA Keras's Dropout runs. The chunked block and the fused updates were measured on CPUs only; with a GPU
present TensorFlow's own kernels run.
"""

import tensorflow as tf

from keras_local.kernels import PortablePaths
from keras_local.kernels.tensorflow import chunked_block, fused_updates, gradients
from keras_local.losses.maths import uses_spatial_std

CHUNKED_LOSSES = ("pred", "sim", "predsim")


def _has_gpu():
    return bool(tf.config.list_physical_devices("GPU"))


def _last_axis(bn, inputs):
    axis = bn.axis if bn.axis >= 0 else bn.axis + len(inputs.shape)
    return axis == len(inputs.shape) - 1


class TensorFlowPaths(PortablePaths):
    """The fast paths of the TensorFlow backend (module doc)."""

    def fuses_leaky_relu(self, bn, inputs):
        """Whether ``batch_norm_leaky_relu`` applies to ``bn`` on ``inputs``."""
        return (gradients.active() and bn.trainable and bn.center and bn.scale
                and bn.compute_dtype == "float32" and inputs.dtype == "float32"
                and _last_axis(bn, inputs))

    def chunks_block(self, block, inputs):
        """Whether ``block_forward`` applies to ``block`` on ``inputs``."""
        if not (block.kind == "conv" and block.strides == 1 and block.bn is not None
                and block.nonlin == "leakyrelu" and not block.bio
                and block.local_loss_name in CHUNKED_LOSSES and block.unsup_loss_spec is None
                and not block.alpha and len(inputs.shape) == 4
                and None not in tuple(inputs.shape[1:])
                and self.fuses_leaky_relu(block.bn, inputs) and not _has_gpu()):
            return False
        if "sim" in block.heads:  # S must read the sim map's spatial std, not the map itself
            _, height, width, _ = inputs.shape
            return uses_spatial_std((None, height, width, block.width), block.similarity_std)
        return True

    def block_forward(self, block, inputs):
        if not self.chunks_block(block, inputs):
            return None
        return chunked_block.block_forward(block, inputs)

    def batch_norm_leaky_relu(self, bn, inputs, negative_slope):
        if not self.fuses_leaky_relu(bn, inputs):
            return None
        return gradients.batch_norm_leaky_relu(
            inputs, tf.cast(bn.gamma, inputs.dtype), tf.cast(bn.beta, inputs.dtype),
            bn.epsilon, negative_slope)

    def batch_norm(self, bn, inputs):
        if not (len(inputs.shape) == 4 and bn.axis in (-1, 3) and bn.center and bn.scale):
            return None
        return gradients.batch_norm(inputs, tf.cast(bn.gamma, inputs.dtype),
                                    tf.cast(bn.beta, inputs.dtype), bn.epsilon)

    def moments(self, bn, inputs):
        if not _last_axis(bn, inputs):
            return None
        return gradients.moments(inputs)

    def leaky_relu(self, x, negative_slope):
        return gradients.leaky_relu_with_output_gradient(x, negative_slope)

    def dropout(self, layer, inputs):
        if not gradients.in_xla():
            return None
        seed = layer.seed_generator.next()
        # The seed state is int64; TensorFlow's stateless ops under XLA need int32 (the
        # reduction keras.random applies too).
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        return tf.nn.experimental.stateless_dropout(inputs, rate=layer.rate, seed=seed,
                                                    rng_alg="threefry")

    def spatial_std(self, flat):
        if not gradients.active():
            return None
        return gradients.spatial_std(flat)

    def fused_updates(self, *variables):
        if tf.distribute.has_strategy() or _has_gpu():
            return None
        resolved = fused_updates.tf_variables(*variables)
        return None if resolved is None else (fused_updates, resolved)


TENSORFLOW = TensorFlowPaths()
