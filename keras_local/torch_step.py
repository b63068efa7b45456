"""The PyTorch train step: autograd per block, every block's input detached.

The update rule is the TensorFlow step's (``tf_step.py``): each block's loss is
differentiated w.r.t. that block's variables only (``torch.autograd.grad``, which
frees the block's graph at once), its output goes on detached, and one optimiser
applies all gradients at the end.
"""

import torch
from keras import ops

from keras_local.blocks import LocalBlock
from keras_local.similarity import pred_loss


def train_step(model, inputs, labels_onehot):
    """Compute and apply one update of ``model``; returns the output logits."""
    if model.config.training_mode in ("backprop", "no_detach"):
        logits, grads, variables = _global_gradients(model, inputs, labels_onehot)
    else:
        logits, grads, variables = _local_gradients(model, inputs, labels_onehot)
    with torch.no_grad():
        model.optimizer.apply(model.with_weight_decay(grads, variables), variables)
    return logits.detach()


def _gradients(loss, variables):
    """d loss / d variables; zeros for a variable the loss does not depend on."""
    grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
    return [torch.zeros_like(v.value) if g is None else g for g, v in zip(grads, variables)]


def _global_gradients(model, inputs, labels_onehot):
    """backprop (output loss only) and no_detach (output + every block's local loss)."""
    with_local_losses = model.config.training_mode == "no_detach"
    h = inputs
    local_losses = []
    for layer in model.feature_layers:
        if with_local_losses and isinstance(layer, LocalBlock):
            h = layer(h, training=True, labels=labels_onehot)
            local_losses.extend(layer.losses)
        else:
            h = layer(h, training=True)
    logits = model.output_layer(h, training=True)
    loss = pred_loss(logits, labels_onehot) * model.config.output_loss_scale
    if local_losses:
        loss = loss + ops.sum(ops.stack(local_losses))
    variables = model.trainable_variables
    return logits, _gradients(loss, variables), variables


def _local_gradients(model, inputs, labels_onehot):
    """Each block's loss differentiated w.r.t. that block's variables only."""
    all_grads, all_variables = [], []
    h = inputs
    for layer in model.feature_layers:
        if not isinstance(layer, LocalBlock):
            h = layer(h, training=True)
            continue
        out = layer(h, training=True, labels=labels_onehot)
        loss = ops.sum(ops.stack(layer.losses))
        variables = layer.trainable_variables
        all_grads.extend(_gradients(loss, variables))
        all_variables.extend(variables)
        h = out.detach()
    logits = model.output_layer(h, training=True)
    loss = pred_loss(logits, labels_onehot) * model.config.output_loss_scale
    variables = model.output_layer.trainable_variables
    all_grads.extend(_gradients(loss, variables))
    all_variables.extend(variables)
    return logits, all_grads, all_variables
