"""Decoupled pipelined training: every block trains at the same time on its own device.

With ``Config(placement="layerwise", pipeline=True)`` the model is cut into stages:
stage k (k = 0 .. n-1) is LocalBlock k with the parameter-free layers (flatten,
pooling) that feed it, and stage n is the layers after the last block plus the output
Dense: the segments of the update rule (``keras_local.steps.rule.plan``). Between stage k and stage k+1 sits a *boundary buffer*: non-trainable
``tf.Variable`` s on stage k+1's device holding block k's output activations, the
one-hot labels that went with them, and a ``valid`` flag.

One train step t does, for every stage at once:

    stage 0 reads the new batch x_t, y_t;
    stage k > 0 reads boundary k-1: what block k-1 produced at step t-1;
    each stage runs its block forward, its own local loss and its own gradients;
    stage k writes its (gradient-stopped) output and labels into boundary k;
    each stage's variables are updated, each as soon as its own gradient exists, and
    the optimiser's step counter advances once.

No stage reads anything another stage computes in the same step, so the stages have no
data dependency on each other and the runtime runs them concurrently on their devices
(the reads of the boundaries are ordered before the writes by TensorFlow's automatic
control dependencies). Block k's gradients only ever come from block k's own loss, as in
the non-pipelined step.

Staleness. Block k at step t trains on the activations that block k-1 computed at step
t-1 with its weights of step t-1 (before that step's update): the input of block k lags
the weights of block k-1 by one update, and the input of block k is the batch that
entered the network k steps earlier. Labels travel with their activations, so every
block's (input, label) pair is consistent; only the representation it learns from is one
update old. No gradient is ever stale (local losses need no backward pass from above).
The output Dense is stage n: it sees the batch of n steps earlier. Its metrics (``loss``,
``error``) are computed against the labels that travelled with that batch, not against
the current batch's.

Filling the pipeline and epoch accounting. Buffers start with ``valid = False``; a stage
whose input is not valid skips its work (no forward, no update, no metrics, no BatchNorm
statistics) and passes ``valid = False`` on. Its weights do not move: each stage's updates run under
its flag, for every optimiser whose Keras ``apply`` is just its ``update_step`` per
variable (``gated_updates_apply``: no clipping, decoupled weight decay, gradient
accumulation, loss scaling, EMA or constraints). Otherwise one ``apply`` updates every
stage, and a skipped stage's zero gradients still move weights whose Adam moments are not
zero (after a restore). So at the very first step only block 0
trains; block k trains from step k on, and from step n on every stage trains at every
step ("full steps"). Keras counts an epoch in batches entering stage 0. The buffers are
*not* emptied at epoch ends: the last k batches of an epoch reach block k during the
first k steps of the next epoch (so block k's metrics of epoch e mix in k batches of
epoch e-1), and only the pipeline fill at the start makes block k see k batches fewer in
total; at the end of training the last k batches are never seen by block k. The buffers
are not part of the model's weights or checkpoints: after a restore (BackupAndRestore,
``--resume``) or in a new process the pipeline fills again (n steps). The last, smaller
batch of an epoch goes through the buffers too (their batch dimension is dynamic).

Steps per execution: a pipelined model compiles with ``Config.steps_per_execution`` = 16
by default (``PIPELINE_STEPS_PER_EXECUTION``), Keras's loop of several steps inside one call
of the train function. Within a call the runtime starts stage k's work of step t+1 while
other stages still finish step t (their updates), so the devices do not wait at every
step's end, and the per-call host work (Python, callbacks, launching the function) is
paid once per 16 steps. Callbacks see a batch end every 16 steps.

Placement and threads: ``Config.placement = "layerwise"`` puts block i on device i mod N
(``keras_local.run.distribute``). On CPU logical devices all devices share the process's
thread pools: give the runtime at least as many inter-op threads as stages that should
run at once. Dropout without a seed draws from Keras's global seed generator, a shared
variable that serialises the stages: give dropout blocks a seed (the architectures do).
"""

import tensorflow as tf

from keras_local.run.distribute import device_scope
from keras_local.steps import rule
from keras_local.steps.tensorflow import TensorFlowExecutor, per_call_safe
from keras_local.steps.tensorflow import test_step  # noqa: F401  (evaluation is not pipelined)


class Boundary:
    """The buffer between two stages: activations, one-hot labels and a 'valid' flag."""

    def __init__(self, name, feature_shape, dtype, num_classes, device):
        self.device = device
        with device_scope(device):
            self.activations = tf.Variable(
                tf.zeros((0,) + tuple(feature_shape), dtype),
                shape=tf.TensorShape((None,) + tuple(feature_shape)),
                trainable=False, name=f"pipeline_{name}_activations")
            self.labels = tf.Variable(
                tf.zeros((0, num_classes), "float32"),
                shape=tf.TensorShape((None, num_classes)),
                trainable=False, name=f"pipeline_{name}_labels")
            self.valid = tf.Variable(False, trainable=False, name=f"pipeline_{name}_valid")

    def read(self):
        with device_scope(self.device):  # where the consuming stage runs
            return (self.activations.read_value(), self.labels.read_value(),
                    self.valid.read_value())

    def write(self, activations, labels, valid):
        self.activations.assign(activations)
        self.labels.assign(labels)
        self.valid.assign(valid)


class PipelineBuffers:
    """The stages of a model and the boundary buffers between them (``model.pipeline_buffers``).

    Built with the model, eagerly: variables cannot be created inside the traced step.
    """

    def __init__(self, model):
        self.stages = rule.plan(model)
        if len(self.stages) < 2:
            raise ValueError("pipeline needs a model with at least one block, got none")
        self.boundaries = []
        shape = (None,) + tuple(model.example_shape)
        for stage, consumer in zip(self.stages[:-1], self.stages[1:]):
            shape = stage.output_shape(shape)
            if isinstance(shape[0], tuple):
                raise ValueError(
                    f"pipeline: segment {stage.name} passes a (h, block input) pair, as the "
                    f"convs inside residual blocks do; the pipelined mode buffers one tensor "
                    f"per boundary: train {model.architecture} without pipeline")
            self.boundaries.append(Boundary(stage.name, shape[1:], stage.layers[-1].compute_dtype,
                                            model.num_classes, consumer.device))

    def reset(self):
        """Mark every buffer empty: the pipeline fills again from the next step."""
        for boundary in self.boundaries:
            boundary.valid.assign(False)


class PipelineExecutor(TensorFlowExecutor):
    """Stage k > 0 reads boundary k-1 (written by the previous step) instead of this step's
    output of stage k-1; a stage whose input is not valid is skipped inside ``tf.cond``."""

    def __init__(self, model):
        super().__init__(model, per_segment_apply=False)
        self.buffers = model.pipeline_buffers
        # What apply needs of the stage that owns a variable, recorded by gradients:
        # variable path -> stage name, and stage name -> ('valid' flag or None, device).
        self.stage_of = {}
        self.stages = {}
        # Every boundary is read before any stage writes one (automatic control
        # dependencies keep this program order for each buffer variable).
        self.feeds = [boundary.read() for boundary in self.buffers.boundaries]

    def segment_input(self, index, previous, labels_onehot):
        if index == 0:
            return previous, labels_onehot, None
        return self.feeds[index - 1]

    def gradients(self, loss_fn, segment, variables, inputs, valid=None):
        self.stages[segment.name] = (valid, segment.device)
        self.stage_of.update({variable.path: segment.name for variable in variables})
        compute = lambda: _flat(super(PipelineExecutor, self).gradients(  # noqa: E731
            loss_fn, segment, variables, inputs))
        if valid is None:
            results = compute()
        else:
            # On the stage's device: the cond's outputs (the gradients) stay there.
            with device_scope(segment.device):
                results = tf.cond(valid, compute, lambda: _skipped(segment, variables, inputs))
        return results[0], results[1:]

    def stop_gradient(self, outputs, after):
        # No control dependency: the next stage reads its boundary, not this output.
        return tf.stop_gradient(outputs)

    def segment_outputs(self, outputs):
        for boundary, (out, labels, valid) in zip(self.buffers.boundaries, outputs):
            boundary.write(out, labels, True if valid is None else valid)

    def apply(self, grads, variables, step=None):
        # Neither path goes through Keras's replica sum of the gradients: under the default
        # strategy that sum is an identity over all of them at once (the IdentityN of a
        # custom gradient), so no stage's update could start before the slowest stage's
        # gradients existed, and every update then ran at the same time, contending for
        # memory bandwidth. In cross-replica context (merge_call) Keras's apply skips the
        # sum, which is the identity here: the pipeline runs without a strategy.
        if not gated_updates_apply(self.model.optimizer):
            return tf.distribute.get_replica_context().merge_call(
                lambda _: TensorFlowExecutor.apply(self, grads, variables, step))
        # A stage that skipped its work must not move: Adam's update with a zero gradient
        # still moves a weight whose moments are not zero (after a restore, when the
        # pipeline fills again). So each stage's updates run under its 'valid' flag,
        # through the optimiser's update_step, which is what Keras's apply reduces to for
        # the optimisers gated_updates_apply admits; the step counter advances once.
        # Each stage's conditional, step and learning rate sit on the stage's device: read
        # there once, not sent from the counter's device for every variable.
        optimizer = self.model.optimizer
        update_at = getattr(optimizer, "update_step_at", None)
        pairs_of = {}
        for grad, variable in zip(grads, variables):
            pairs_of.setdefault(self.stage_of.get(variable.path), []).append((grad, variable))
        for stage, pairs in pairs_of.items():
            valid, device = self.stages.get(stage, (None, None))

            def update(pairs=pairs):
                learning_rate = tf.identity(optimizer.learning_rate)
                step = optimizer.iterations + 1 if update_at is not None else None
                for grad, variable in pairs:
                    with tf.device(variable.value.device):
                        if update_at is not None:
                            update_at(grad, variable, learning_rate, step)
                        else:
                            optimizer.update_step(grad, variable, learning_rate)

            with device_scope(device):
                self.run(update, when=valid)
        optimizer.iterations.assign_add(1)
        return []

    def run(self, function, when=None):
        if when is None:
            return function()

        def guarded():
            function()
            return tf.constant(True)

        tf.cond(when, guarded, lambda: tf.constant(False))
        return None


def gated_updates_apply(optimizer):
    """Whether Keras's ``apply`` of ``optimizer`` is only its ``update_step`` per variable
    and one step of the counter (no clipping, decoupled weight decay, gradient
    accumulation, loss scaling, EMA or constraints), so that the pipelined step may call
    ``update_step`` per stage itself."""
    if not per_call_safe(optimizer):  # loss-scale wrapper, global clip, EMA
        return False
    unsupported = ("clipnorm", "clipvalue", "weight_decay", "gradient_accumulation_steps",
                   "loss_scale_factor")
    if any(getattr(optimizer, name, None) for name in unsupported):
        return False
    return not any(getattr(variable, "constraint", None) is not None
                   or getattr(variable, "overwrite_with_gradient", False)
                   for variable in getattr(optimizer, "_trainable_variables", []))


def _flat(out_and_grads):
    out, grads = out_and_grads
    return [tf.stop_gradient(out)] + list(grads)


def _skipped(segment, variables, x):
    """What an idle stage returns: a zero output of the right shape, zero gradients."""
    shape = segment.output_shape((None,) + tuple(x.shape[1:]))
    with device_scope(segment.device):
        out = tf.zeros(tf.concat([tf.shape(x)[:1], shape[1:]], axis=0),
                       segment.layers[-1].compute_dtype)
        return [out] + [tf.zeros(v.shape, v.dtype) for v in variables]


def train_step(model, data):
    """One pipelined step over every stage at once; see the module docstring."""
    inputs, labels_onehot = rule.split_batch(model, data)
    return rule.train(model, PipelineExecutor(model), inputs, labels_onehot)
