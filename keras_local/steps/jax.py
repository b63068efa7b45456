"""The JAX executor: stateless, one ``jax.value_and_grad`` per segment.

Keras's JAX trainer calls ``model.train_step(state, data)`` with
``state = (trainable, non_trainable, optimizer, metrics)`` variable values and expects
``(logs, new_state)``; during ``fit`` the model's own variables may hold no value at all.
Every layer call therefore runs inside a ``keras.StatelessScope`` that maps *every* model
variable to its current value (a scope does not look into an enclosing one), and whatever
a call assigns (BatchNorm moving statistics, dropout seeds, the metrics) is read back
from the scope and carried on to the next call.
"""

import contextlib

import jax
import keras
from keras import ops

from keras_local.steps import rule


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


class JaxExecutor(rule.SequentialSchedule):
    """Gradients with ``jax.value_and_grad`` over the segment's variable values."""

    replica_scale = 1.0

    def __init__(self, model, trainable, non_trainable, metrics, optimizer_variables=None):
        self.model = model
        self.values = _StateValues(model, trainable, non_trainable, metrics)
        self.state_variables = list(model.non_trainable_variables) + list(model.metrics_variables)
        self.trainable = list(trainable)
        self.optimizer_variables = optimizer_variables

    @staticmethod
    def device_scope(device):
        return contextlib.nullcontext()

    def gradients(self, loss_fn, segment, variables, inputs, valid=None):
        def stateless_loss(variable_values):
            with self.values.scope(zip(variables, variable_values)) as scope:
                loss, out = loss_fn(inputs)
            return loss, (out, self.values.assigned(scope, self.state_variables))

        (_, (out, state)), grads = jax.value_and_grad(stateless_loss, has_aux=True)(
            [self.values[v] for v in variables])
        self.values.update(self.state_variables, state)
        return out, grads

    def stop_gradient(self, outputs, after):
        return rule.stop_gradient_structure(outputs, ops.stop_gradient)

    def apply(self, grads, variables, step=None):
        by_id = {id(v): g for v, g in zip(variables, grads)}
        trainable_variables = self.model.trainable_variables
        grads = [by_id.get(id(v), ops.zeros_like(value))
                 for v, value in zip(trainable_variables, self.trainable)]
        self.trainable, self.optimizer_variables = self.model.optimizer.stateless_apply(
            self.optimizer_variables, grads, self.trainable)
        self.values.update(trainable_variables, self.trainable)

    def run(self, function, when=None):
        with self.values.scope() as scope:
            result = function()
        self.values.update(self.state_variables, self.values.assigned(scope, self.state_variables))
        return result

    def non_trainable_values(self):
        return [self.values[v] for v in self.model.non_trainable_variables]

    def metric_values(self):
        return [self.values[v] for v in self.model.metrics_variables]


def train_step(model, state, data):
    """One update of ``model`` from ``state``; returns ``(logs, new_state)``."""
    trainable, non_trainable, optimizer_variables, metrics = state
    executor = JaxExecutor(model, trainable, non_trainable, metrics, optimizer_variables)
    inputs, labels_onehot = rule.split_batch(model, data)
    logs = rule.train(model, executor, inputs, labels_onehot)
    return logs, (executor.trainable, executor.non_trainable_values(),
                  executor.optimizer_variables, executor.metric_values())


def test_step(model, state, data):
    """Evaluation on ``state = (trainable, non_trainable, metrics)``; returns ``(logs, state)``."""
    trainable, non_trainable, metrics = state
    executor = JaxExecutor(model, trainable, non_trainable, metrics)
    inputs, labels_onehot = rule.split_batch(model, data)
    logs = rule.evaluate(model, executor, inputs, labels_onehot)
    return logs, (trainable, executor.non_trainable_values(), executor.metric_values())
