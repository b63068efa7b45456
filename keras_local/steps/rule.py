"""The update rule of a local network, written once for every backend.

A training step is a walk over *segments*: consecutive layers trained by one loss, whose
input arrives with its gradient stopped (``plan``):

- local modes (pred / sim / predsim): one segment per block that carries heads, holding
  that block and the layers that feed it since the previous such block (parameter-free
  layers; with ``--modules K`` also the head-less blocks of its module); its loss is the
  block's local loss. A last segment holds the layers after the last block and the output
  Dense; its loss is the output cross-entropy times ``config.output_loss_scale``
  (1 - beta in predsim). No gradient crosses a segment boundary.
- backprop: one segment, the whole network, trained by the output cross-entropy.
- no_detach: one segment, the whole network, trained by the output cross-entropy plus
  every block's local loss.

Every loss is multiplied by the executor's ``replica_scale`` (1 / replicas: Keras sums
gradients over tf.distribute replicas). An *executor* (``Executor``: ``keras_local.steps.tensorflow``,
``.jax``, ``.torch``, ``.pipeline``) supplies only the backend's mechanics: the gradient
of a segment's loss with respect to the segment's variables, a gradient stop, running a
stateful function, and applying the optimiser's updates.
"""

import dataclasses
from typing import Any, Callable, Optional, Protocol, Sequence

import keras
from keras import ops

from keras_local.layers.block import LocalBlock
from keras_local.losses.maths import pred_loss


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive layers trained by one loss; ``devices`` per layer (None: no placement)."""

    name: str
    layers: tuple
    devices: tuple

    @property
    def trainable_variables(self):
        return [v for layer in self.layers for v in layer.trainable_variables]

    @property
    def device(self):
        """The device that computes the segment's gradients: the one all its layers share
        (None when they are spread over several or not placed)."""
        distinct = set(self.devices)
        return self.devices[-1] if len(distinct) == 1 else None

    def output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = tuple(layer.compute_output_shape(shape))
        return shape


class Executor(Protocol):
    """What ``train`` and ``evaluate`` need of a backend; one implementation per executor
    module. Tensors and variables are the backend's; ``valid`` is None except in the
    pipelined executor, where it is the boolean flag of a stage whose input may be empty.
    """

    #: Every loss is multiplied by it (1 / replicas: Keras sums gradients over replicas).
    replica_scale: float
    #: True: each segment's gradients are applied as soon as they exist
    #: (``begin_updates`` once, then ``apply(..., step=start)`` per segment).
    per_segment_apply: bool

    def device_scope(self, device: Optional[str]) -> Any:
        """A context manager placing what runs inside on ``device`` (None: anywhere)."""

    def segment_input(self, index: int, previous: Any, labels_onehot: Any) -> tuple:
        """(inputs, one-hot labels, valid) of segment ``index``; ``previous`` is the
        stopped output of segment ``index - 1`` in this step."""

    def gradients(self, loss_fn: Callable, segment: Segment, variables: Sequence,
                  inputs: Any, valid: Any = None) -> tuple:
        """(output, gradients of ``variables``) of ``loss_fn(inputs) -> (loss, output)``;
        a zero gradient, never None, for a variable the loss does not reach."""

    def stop_gradient(self, outputs: Any, after: Sequence) -> Any:
        """``outputs`` with no gradient flowing back, available only after ``after``."""

    def apply(self, grads: Sequence, variables: Sequence, step: Any = None) -> Any:
        """The optimiser's update of ``variables``; ``step``: the counter every
        per-segment apply of this training step sees (None: one apply per step).
        Returns what ``stop_gradient(..., after=)`` may wait for."""

    def begin_updates(self) -> Any:
        """The optimiser's step counter before this step's first per-segment apply."""

    def run(self, function: Callable, when: Any = None) -> Any:
        """``function()``, stateful (metrics, dropout); only where ``when`` is true."""

    def segment_outputs(self, outputs: list) -> None:
        """Called once with every segment's (output, labels, valid) of the step."""


def plan(model):
    """The model's segments in order (see the module docstring)."""
    layers = list(model.feature_layers) + [model.output_layer]
    layer_devices, output_device = model.layer_devices()
    devices = list(layer_devices) + [output_device]
    if model.config.training_mode in ("backprop", "no_detach"):
        return [Segment("network", tuple(layers), tuple(devices))]
    segments, start = [], 0
    for index, layer in enumerate(layers):
        if (isinstance(layer, LocalBlock) and layer.has_heads) or index == len(layers) - 1:
            name = "output" if index == len(layers) - 1 else layer.name
            segments.append(Segment(name, tuple(layers[start:index + 1]),
                                    tuple(devices[start:index + 1])))
            start = index + 1
    return segments


def segment_loss(model, segment, inputs, labels_onehot, device_scope):
    """(loss, output) of ``segment`` on ``inputs`` in training mode.

    Blocks with heads add their local loss; the output Dense adds its cross-entropy times
    ``config.output_loss_scale``. ``device_scope(device)`` places each layer.
    """
    h, losses = inputs, []
    for layer, device in zip(segment.layers, segment.devices):
        with device_scope(device):
            if layer is model.output_layer:
                h = layer(h, training=True)
                losses.append(pred_loss(h, labels_onehot) * model.config.output_loss_scale)
            elif isinstance(layer, LocalBlock) and layer.has_heads:
                defer = layer is segment.layers[-1] and layer.defers_dropout
                h = layer(h, training=True, labels=labels_onehot,
                          **({"dropout": False} if defer else {}))
                losses.extend(layer.losses)
            else:
                h = layer(h, training=True)
    loss = losses[0] if len(losses) == 1 else ops.sum(ops.stack(losses))
    return loss, h


def deferred_dropout(segment):
    """The dropout of the block that ends a local segment (None if there is none).

    ``segment_loss`` leaves it out and ``train`` applies it to the segment's output after
    the segment's gradients: it has no weights and no gradient crosses the boundary, so
    the update is the same, but the dropped-out copy of the block's output no longer
    exists while the segment's backward pass runs.
    """
    last = segment.layers[-1]
    if isinstance(last, LocalBlock) and last.has_heads and last.defers_dropout:
        return last.dropout
    return None


def split_batch(model, data):
    """(inputs, one-hot labels) of a Keras data batch ``(x, y, ...)``."""
    inputs, labels = data[0], data[1]
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    return inputs, ops.one_hot(labels, model.num_classes)


def train(model, executor: Executor, inputs, labels_onehot):
    """One update of ``model`` through ``executor``; returns the step's logs.

    With ``executor.per_segment_apply`` each segment's gradients are applied as soon as
    they exist (``executor.apply(..., step=start)``, every apply seeing the optimiser step
    of this training step), so they and the segment's activations can be freed before the
    next segment runs; otherwise all gradients are applied once at the end. Both give the
    same weights (segments own disjoint variables; tests/test_rule.py).
    """
    per_segment = executor.per_segment_apply
    start = executor.begin_updates() if per_segment else None
    all_grads, all_variables = [], []
    previous = inputs
    outputs = []
    segments = plan(model)
    for index, segment in enumerate(segments):
        x, labels, valid = executor.segment_input(index, previous, labels_onehot)
        scale = executor.replica_scale

        def loss_fn(x, segment=segment, labels=labels):
            loss, out = segment_loss(model, segment, x, labels, executor.device_scope)
            return loss * scale, out

        variables = segment.trainable_variables
        out, grads = executor.gradients(loss_fn, segment, variables, x, valid)
        if per_segment:
            done = executor.apply(grads, variables, step=start)
            previous = executor.stop_gradient(out, after=done)
        else:
            all_grads.extend(grads)
            all_variables.extend(variables)
            previous = executor.stop_gradient(out, after=grads)
        dropout = deferred_dropout(segment)
        if dropout is not None:
            with executor.device_scope(segment.device):
                previous = executor.run(lambda x=previous: dropout(x, training=True))
        outputs.append((previous, labels, valid))
    executor.segment_outputs(outputs)
    if not per_segment:
        executor.apply(all_grads, all_variables)
    logits, labels, valid = outputs[-1]
    with executor.device_scope(segments[-1].device):
        executor.run(lambda: model.update_output_metrics(logits, labels), when=valid)
    return executor.run(model.metric_results)


def evaluate(model, executor: Executor, inputs, labels_onehot):
    """One evaluation batch: output metrics in inference mode; returns loss and error."""

    def update():
        model.update_output_metrics(model(inputs, training=False), labels_onehot)
        return {"loss": model.loss_tracker.result(), "error": model.error_tracker.result()}

    return executor.run(update)


class SequentialSchedule:
    """Segment k reads segment k-1's output of this step (every non-pipelined executor);
    all gradients are applied once at the end unless an executor says otherwise."""

    per_segment_apply = False

    def begin_updates(self):
        raise NotImplementedError("per-segment applies: set per_segment_apply and "
                                  "implement begin_updates")

    def segment_input(self, index, previous, labels_onehot):
        return previous, labels_onehot, None

    def segment_outputs(self, outputs):
        pass


def stop_gradient_structure(outputs, stop):
    """``stop`` applied to every tensor of ``outputs`` (a tensor or a nested structure)."""
    return keras.tree.map_structure(stop, outputs)
