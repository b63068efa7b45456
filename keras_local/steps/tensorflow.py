"""The TensorFlow executor: one GradientTape per segment, in segment order.

Segment k+1's forward pass waits (control dependency) for segment k's gradients, so the
runtime can free segment k's activations before the next ones exist: memory then holds
about one block's activations, not the whole network's. The graph executor honours this;
XLA drops control edges between pure ops: compiled whole, the vgg19 predsim step
(32x32x3, batch 128) peaked 622 MiB above its baseline, as much as backprop (600 MiB),
with or without an XLA OptimizationBarrier, against 256 MiB here. For networks with conv
blocks ``LocalModel.compile`` therefore XLA-compiles only the optimiser update
(``model.xla_update``).
"""

import keras
import tensorflow as tf

from keras_local.run.distribute import device_scope
from keras_local.steps import rule


class TensorFlowExecutor(rule.SequentialSchedule):
    """Gradients with ``tf.GradientTape``; losses divided by the replica count because
    Keras sums gradients across replicas (docs/design.md section 3)."""

    device_scope = staticmethod(device_scope)

    def __init__(self, model, per_segment_apply=None):
        self.model = model
        self.replica_scale = 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
        if per_segment_apply is None:
            # Under a strategy the counter cannot be set back inside the step's nested
            # update function (merge_call in a tf.function): one apply at the end there.
            per_segment_apply = (per_call_safe(model.optimizer)
                                 and not tf.distribute.has_strategy())
        self.per_segment_apply = per_segment_apply

    def begin_updates(self):
        """The optimiser's step counter before this training step's first apply."""
        optimizer = self.model.optimizer
        if not optimizer.built:  # a per-segment apply would build it on one segment only
            optimizer.build(self.model.trainable_variables)
        return tf.identity(optimizer.iterations)

    def gradients(self, loss_fn, segment, variables, inputs, valid=None):
        with device_scope(segment.device), tf.GradientTape() as tape:
            loss, out = loss_fn(inputs)
        with device_scope(segment.device):
            # The backward pass starts from a seed that exists only once the loss does.
            # Seeded by a constant, the backward ops of one head (the pred head's, whose
            # share of the loss is a constant factor) run while the other head's forward
            # pass still runs, and their full-size gradient maps wait, alive, for the
            # other head's gradients to be added to them.
            with tf.control_dependencies([loss]):
                seed = tf.identity(tf.ones_like(loss))
            grads = tape.gradient(loss, variables, output_gradients=seed)
        return out, _zeros_for_none(grads, variables)

    def stop_gradient(self, outputs, after):
        with tf.control_dependencies(after):
            return rule.stop_gradient_structure(outputs, lambda t: tf.stop_gradient(tf.identity(t)))

    def apply(self, grads, variables, step=None):
        """Apply ``grads``; returns a tensor available once the update is done. ``step``
        (per-segment applies): the counter is set back to it first, so that every
        segment's apply sees the same step t+1 and the counter ends at t+1."""
        optimizer = self.model.optimizer

        def update(grads):
            if step is not None:
                optimizer.iterations.assign(step)
            optimizer.apply(grads, variables)
            return tf.constant(0)

        # Only the update is compiled: a dozen element-wise ops per variable that XLA
        # fuses into one pass over the weights; the blocks stay on oneDNN kernels. As a
        # function call, its output exists only once every assignment in it has run.
        if step is None and not self.model.xla_update:
            return [update(grads)]
        return [tf.function(update, jit_compile=bool(self.model.xla_update))(grads)]

    def run(self, function, when=None):
        return function()


def per_call_safe(optimizer):
    """True when ``optimizer.apply`` on disjoint subsets of the variables, with the step
    counter set back before each, gives the update of one apply on all of them: not with
    a global gradient norm clip, moving averages of all weights (EMA) or a loss-scale
    wrapper (one finiteness check and scale update per step)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return False
    return not (getattr(optimizer, "global_clipnorm", None) or getattr(optimizer, "use_ema", False))


def _zeros_for_none(grads, variables):
    return [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]


def train_step(model, data):
    inputs, labels_onehot = rule.split_batch(model, data)
    return reducible_logs(rule.train(model, TensorFlowExecutor(model), inputs, labels_onehot))


def test_step(model, data):
    inputs, labels_onehot = rule.split_batch(model, data)
    return reducible_logs(rule.evaluate(model, TensorFlowExecutor(model), inputs, labels_onehot))


def reducible_logs(logs):
    """A step's logs; shape (1,) under MultiWorkerMirroredStrategy, where Keras 3.15
    reduces them with ``reduce(MEAN, axis=0)``, which fails on scalars
    (keras-team/keras#20585) and gives the mean over replicas of shape-(1,) values."""
    if not isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return logs
    return {name: tf.reshape(value, (1,)) for name, value in logs.items()}
