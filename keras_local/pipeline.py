"""Decoupled pipelined training: every block trains at the same time on its own device.

With ``Config(placement="layerwise", pipeline=True)`` the model is cut into stages:
stage k (k = 0 .. n-1) is LocalBlock k with the parameter-free layers (flatten,
pooling) that feed it, and stage n is the layers after the last block plus the output
Dense. Between stage k and stage k+1 sits a *boundary buffer*: non-trainable
``tf.Variable`` s on stage k+1's device holding block k's output activations, the
one-hot labels that went with them, and a ``valid`` flag.

One train step t does, for every stage at once:

    stage 0 reads the new batch x_t, y_t;
    stage k > 0 reads boundary k-1: what block k-1 produced at step t-1;
    each stage runs its block forward, its own local loss and its own gradients;
    stage k writes its (gradient-stopped) output and labels into boundary k;
    one optimiser apply updates every stage's variables.

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
statistics) and passes ``valid = False`` on. So at the very first step only block 0
trains; block k trains from step k on, and from step n on every stage trains at every
step ("full steps"). Keras counts an epoch in batches entering stage 0. The buffers are
*not* emptied at epoch ends: the last k batches of an epoch reach block k during the
first k steps of the next epoch (so block k's metrics of epoch e mix in k batches of
epoch e-1), and only the pipeline fill at the start makes block k see k batches fewer in
total; at the end of training the last k batches are never seen by block k. The buffers
are not part of the model's weights or checkpoints: after a restore (BackupAndRestore,
``--resume``) or in a new process the pipeline fills again (n steps). The last, smaller
batch of an epoch goes through the buffers too (their batch dimension is dynamic).

Placement and threads: ``Config.placement = "layerwise"`` puts block i on device i mod N
(``keras_local.distribute``). On CPU logical devices all devices share the process's
thread pools: give the runtime at least as many inter-op threads as stages that should
run at once. Dropout without a seed draws from Keras's global seed generator, a shared
variable that serialises the stages: give dropout blocks a seed (the architectures do).
"""

import tensorflow as tf
from keras import ops

from keras_local.blocks import LocalBlock
from keras_local.distribute import check_scale_out, device_scope
from keras_local.similarity import pred_loss


class Stage:
    """Layers that one pipeline stage runs on one device: ``layers`` (parameter-free,
    e.g. flatten / pooling) then ``block`` (a LocalBlock, or None for the output stage)."""

    def __init__(self, layers, block, device):
        self.layers = list(layers)
        self.block = block
        self.device = device

    def __repr__(self):
        name = self.block.name if self.block is not None else "output"
        return f"Stage({name!r}, device={self.device!r})"


class Boundary:
    """The buffer between two stages: activations, one-hot labels and a 'valid' flag."""

    def __init__(self, name, feature_shape, dtype, num_classes, device):
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
        return self.activations.read_value(), self.labels.read_value(), self.valid.read_value()

    def write(self, activations, labels, valid):
        self.activations.assign(activations)
        self.labels.assign(labels)
        self.valid.assign(valid)


def pipeline_stages(model):
    """The stages of ``model``: one per LocalBlock, then the output stage."""
    layer_devices, output_device = model.layer_devices()
    stages, pending = [], []
    for layer, device in zip(model.feature_layers, layer_devices):
        if isinstance(layer, LocalBlock):
            stages.append(Stage(pending, layer, device))
            pending = []
        else:
            pending.append(layer)
    stages.append(Stage(pending, None, output_device))
    return stages


class PipelineBuffers:
    """The stages of a model and the boundary buffers between them (``model.pipeline_buffers``).

    Built with the model, eagerly: variables cannot be created inside the traced step.
    """

    def __init__(self, model):
        check_scale_out(model.config)
        self.stages = pipeline_stages(model)
        if len(self.stages) < 2:
            raise ValueError("pipeline needs a model with at least one block, got none")
        self.boundaries = []
        shape = (None,) + tuple(model.example_shape)
        for stage, consumer in zip(self.stages[:-1], self.stages[1:]):
            for layer in stage.layers + [stage.block]:
                shape = tuple(layer.compute_output_shape(shape))
            self.boundaries.append(Boundary(stage.block.name, shape[1:], stage.block.compute_dtype,
                                            model.num_classes, consumer.device))

    def reset(self):
        """Mark every buffer empty: the pipeline fills again from the next step."""
        for boundary in self.boundaries:
            boundary.valid.assign(False)


def train_step(model, inputs, labels_onehot):
    """One pipelined step over every stage at once; see the module docstring.

    Returns None: the output stage updates the output metrics itself, against the labels
    that travelled with its (delayed) batch.
    """
    buffers = model.pipeline_buffers
    # Every boundary is read before any stage writes one (automatic control dependencies
    # keep this program order for each buffer variable).
    feeds = [(inputs, labels_onehot, None)] + [boundary.read() for boundary in buffers.boundaries]
    outputs, all_grads, all_variables = [], [], []
    for stage, (x, labels, valid) in zip(buffers.stages, feeds):
        variables = _stage_variables(model, stage)
        out, grads = _run_stage(model, stage, variables, x, labels, valid)
        outputs.append(out)
        all_grads.extend(grads)
        all_variables.extend(variables)
    for boundary, out, (_, labels, valid) in zip(buffers.boundaries, outputs, feeds):
        boundary.write(out, labels, True if valid is None else valid)
    model.optimizer.apply(all_grads, all_variables)
    return None


def _stage_variables(model, stage):
    layer = stage.block if stage.block is not None else model.output_layer
    return layer.trainable_variables


def _run_stage(model, stage, variables, x, labels, valid):
    """(gradient-stopped output, gradients of the stage's own loss); skipped (zeros, no
    state change) when ``valid`` is False. ``valid`` None: always valid (stage 0)."""

    def compute():
        with device_scope(stage.device):
            h = x
            for layer in stage.layers:
                h = layer(h, training=True)
            with tf.GradientTape() as tape:
                if stage.block is not None:
                    out = stage.block(h, training=True, labels=labels)
                    loss = ops.sum(ops.stack(stage.block.losses))
                else:
                    out = model.output_layer(h, training=True)
                    loss = pred_loss(out, labels) * model.config.output_loss_scale
            grads = tape.gradient(loss, variables)
            grads = [tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, variables)]
            grads = model.with_weight_decay(grads, variables)
            if stage.block is None:
                model._update_output_metrics(out, labels, ops.argmax(labels, axis=-1))
            return [tf.stop_gradient(out)] + list(grads)

    if valid is None:
        results = compute()
    else:
        results = tf.cond(valid, compute, lambda: _skipped(model, stage, variables, x))
    return results[0], results[1:]


def _skipped(model, stage, variables, x):
    """What an idle stage returns: a zero output of the right shape, zero gradients."""
    shape = (None,) + tuple(x.shape[1:])
    for layer in stage.layers + [stage.block if stage.block is not None else model.output_layer]:
        shape = tuple(layer.compute_output_shape(shape))
    layer = stage.block if stage.block is not None else model.output_layer
    with device_scope(stage.device):
        out = tf.zeros(tf.concat([tf.shape(x)[:1], shape[1:]], axis=0), layer.compute_dtype)
        return [out] + [tf.zeros(v.shape, v.dtype) for v in variables]
