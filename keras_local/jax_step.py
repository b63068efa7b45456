"""The JAX train and test steps: stateless, one ``jax.value_and_grad`` per block.

Keras's JAX trainer calls ``model.train_step(state, data)`` with
``state = (trainable, non_trainable, optimizer, metrics)`` variable values and
expects ``(logs, new_state)``; during ``fit`` the model's own variables may hold no
value at all. Every layer call therefore runs inside a ``keras.StatelessScope`` that
maps *every* model variable to its current value (a scope does not look into an
enclosing one), and whatever a call assigns (BatchNorm moving statistics, dropout
seeds, the blocks' metrics) is read back from the scope and carried on to the next
call. The update rule is the TensorFlow step's (``tf_step.py``): each block's loss is
differentiated w.r.t. that block's variables only, its output goes on with its
gradient stopped, and one optimiser applies all gradients at the end.
"""

import jax
import keras
from keras import ops

from keras_local.blocks import LocalBlock
from keras_local.similarity import pred_loss


class _StateValues:
    """Current values of a model's trainable, non-trainable and metric variables."""

    def __init__(self, model, trainable, non_trainable, metrics):
        self.variables = (list(model.trainable_variables) + list(model.non_trainable_variables)
                          + list(model.metrics_variables))
        self.values = {id(v): value for v, value in zip(
            self.variables, list(trainable) + list(non_trainable) + list(metrics))}

    def __getitem__(self, variable):
        return self.values[id(variable)]

    def scope(self, overrides=()):
        """A StatelessScope mapping every variable to its value (or to ``overrides``)."""
        values = dict(self.values)
        values.update((id(v), value) for v, value in overrides)
        return keras.StatelessScope(
            state_mapping=[(v, values[id(v)]) for v in self.variables], collect_losses=True)

    def assigned(self, scope, variables):
        """The values ``variables`` have at the end of ``scope`` (assigned or not)."""
        return [scope.get_current_value(v) for v in variables]

    def update(self, variables, values):
        self.values.update((id(v), value) for v, value in zip(variables, values))


def _state_variables(model):
    """The variables a forward pass may assign: BatchNorm statistics, seeds, metrics."""
    return list(model.non_trainable_variables) + list(model.metrics_variables)


def train_step(model, state, data):
    """One update of ``model`` from ``state``; returns ``(logs, new_state)``."""
    trainable, non_trainable, optimizer_variables, metrics = state
    inputs, labels = data[0], data[1]
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    labels_onehot = ops.one_hot(labels, model.num_classes)
    values = _StateValues(model, trainable, non_trainable, metrics)

    if model.config.training_mode in ("backprop", "no_detach"):
        logits, grads_by_id = _global_gradients(model, values, inputs, labels_onehot)
    else:
        logits, grads_by_id = _local_gradients(model, values, inputs, labels_onehot)
    variables = model.trainable_variables
    grads = [grads_by_id.get(id(v), ops.zeros_like(value))
             for v, value in zip(variables, trainable)]
    grads = model.with_weight_decay(grads, list(trainable))
    new_trainable, optimizer_variables = model.optimizer.stateless_apply(
        optimizer_variables, grads, trainable)

    with values.scope() as scope:
        model._update_output_metrics(logits, labels_onehot, labels)
        logs = {m.name: m.result() for m in model.metrics}
    metric_variables = model.metrics_variables
    new_metrics = values.assigned(scope, metric_variables)
    new_non_trainable = [values[v] for v in model.non_trainable_variables]
    return logs, (new_trainable, new_non_trainable, optimizer_variables, new_metrics)


def test_step(model, state, data):
    """Evaluation on ``state = (trainable, non_trainable, metrics)``; returns ``(logs, state)``."""
    trainable, non_trainable, metrics = state
    inputs, labels = data[0], data[1]
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    values = _StateValues(model, trainable, non_trainable, metrics)
    with values.scope() as scope:
        logits = model(inputs, training=False)
        model._update_output_metrics(logits, ops.one_hot(labels, model.num_classes), labels)
        logs = {"loss": model.loss_tracker.result(), "error": model.error_tracker.result()}
    new_non_trainable = values.assigned(scope, model.non_trainable_variables)
    new_metrics = values.assigned(scope, model.metrics_variables)
    return logs, (trainable, new_non_trainable, new_metrics)


def _global_gradients(model, values, inputs, labels_onehot):
    """backprop (output loss only) and no_detach (output + every block's local loss)."""
    with_local_losses = model.config.training_mode == "no_detach"
    variables = model.trainable_variables
    state_variables = _state_variables(model)

    def loss_fn(trainable):
        with values.scope(zip(variables, trainable)) as scope:
            h = inputs
            for layer in model.feature_layers:
                if with_local_losses and isinstance(layer, LocalBlock):
                    h = layer(h, training=True, labels=labels_onehot)
                else:
                    h = layer(h, training=True)
            logits = model.output_layer(h, training=True)
            local_losses = list(scope.losses)
        loss = pred_loss(logits, labels_onehot) * model.config.output_loss_scale
        if local_losses:
            loss = loss + ops.sum(ops.stack(local_losses))
        return loss, (logits, values.assigned(scope, state_variables))

    (_, (logits, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        [values[v] for v in variables])
    values.update(state_variables, state)
    return logits, {id(v): g for v, g in zip(variables, grads)}


def _local_gradients(model, values, inputs, labels_onehot):
    """Each block's loss differentiated w.r.t. that block's variables only."""
    state_variables = _state_variables(model)
    grads_by_id = {}

    def differentiate(layer, loss_of_outputs, h, **kwargs):
        """value_and_grad of ``loss_of_outputs(layer(h))`` w.r.t. the layer's variables."""
        variables = layer.trainable_variables

        def loss_fn(layer_values):
            with values.scope(zip(variables, layer_values)) as scope:
                out = layer(h, training=True, **kwargs)
                loss = loss_of_outputs(out, scope.losses)
            return loss, (out, values.assigned(scope, state_variables))

        (_, (out, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            [values[v] for v in variables])
        values.update(state_variables, state)
        grads_by_id.update((id(v), g) for v, g in zip(variables, grads))
        return out

    h = inputs
    for layer in model.feature_layers:
        if not isinstance(layer, LocalBlock):
            with values.scope() as scope:
                h = layer(h, training=True)
            values.update(state_variables, values.assigned(scope, state_variables))
            continue
        out = differentiate(layer, lambda out, losses: ops.sum(ops.stack(losses)), h,
                            labels=labels_onehot)
        h = ops.stop_gradient(out)
    scale = model.config.output_loss_scale
    logits = differentiate(
        model.output_layer, lambda logits, losses: pred_loss(logits, labels_onehot) * scale, h)
    return logits, grads_by_id
