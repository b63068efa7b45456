"""The TensorFlow train step: one GradientTape per block, nothing crosses a boundary."""

import tensorflow as tf
from keras import ops

from keras_local.blocks import LocalBlock
from keras_local.distribute import device_scope
from keras_local.similarity import pred_loss


def train_step(model, inputs, labels_onehot):
    """Compute and apply one update of ``model``; returns the output logits.

    Losses are divided by the number of replicas because Keras sums gradients
    across replicas (see PITFALLS: custom train_step under tf.distribute).
    """
    replica_scale = 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
    if model.config.training_mode in ("backprop", "no_detach"):
        logits, grads, variables = _global_gradients(model, inputs, labels_onehot, replica_scale)
    else:
        logits, grads, variables = _local_gradients(model, inputs, labels_onehot, replica_scale)
    model.optimizer.apply(model.with_weight_decay(grads, variables), variables)
    return logits


def _global_gradients(model, inputs, labels_onehot, replica_scale):
    """backprop (output loss only) and no_detach (output + every block's local loss)."""
    with_local_losses = model.config.training_mode == "no_detach"
    layer_devices, output_device = model.layer_devices()
    with tf.GradientTape() as tape:
        h = inputs
        local_losses = []
        for layer, device in zip(model.feature_layers, layer_devices):
            with device_scope(device):
                if with_local_losses and isinstance(layer, LocalBlock):
                    h = layer(h, training=True, labels=labels_onehot)
                    local_losses.extend(layer.losses)
                else:
                    h = layer(h, training=True)
        with device_scope(output_device):
            logits = model.output_layer(h, training=True)
        loss = pred_loss(logits, labels_onehot) * model.config.output_loss_scale
        loss = (loss + ops.sum(ops.stack(local_losses)) if local_losses else loss) * replica_scale
    variables = model.trainable_variables
    return logits, tape.gradient(loss, variables), variables


def _local_gradients(model, inputs, labels_onehot, replica_scale):
    """Each block's loss differentiated w.r.t. that block's variables only.

    Block k+1's forward pass waits (control dependency) for block k's gradients, so
    the runtime can free block k's activations before the next ones exist: memory
    then holds about one block's activations, not the whole network's.
    """
    all_grads, all_variables = [], []
    h = inputs
    layer_devices, output_device = model.layer_devices()  # all None without placement
    for layer, device in zip(model.feature_layers, layer_devices):
        if not isinstance(layer, LocalBlock):
            with device_scope(device):
                h = layer(h, training=True)
            continue
        with device_scope(device), tf.GradientTape() as tape:
            out = layer(h, training=True, labels=labels_onehot)
            loss = ops.sum(ops.stack(layer.losses)) * replica_scale
        variables = layer.trainable_variables
        with device_scope(device):
            grads = tape.gradient(loss, variables)
        with tf.control_dependencies(grads):
            h = tf.stop_gradient(tf.identity(out))
        all_grads.extend(grads)
        all_variables.extend(variables)
    with device_scope(output_device), tf.GradientTape() as tape:
        logits = model.output_layer(h, training=True)
        loss = pred_loss(logits, labels_onehot) * model.config.output_loss_scale * replica_scale
    variables = model.output_layer.trainable_variables
    all_grads.extend(tape.gradient(loss, variables))
    all_variables.extend(variables)
    return logits, all_grads, all_variables
