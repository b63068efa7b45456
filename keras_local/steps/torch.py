"""The PyTorch executor: ``torch.autograd.grad`` per segment (which frees the segment's
graph at once), every segment's input detached."""

import contextlib

import torch

from keras_local.steps import rule


class TorchExecutor(rule.SequentialSchedule):
    """Gradients with ``torch.autograd.grad`` w.r.t. the variables' tensors."""

    replica_scale = 1.0

    def __init__(self, model):
        self.model = model

    @staticmethod
    def device_scope(device):
        return contextlib.nullcontext()

    def gradients(self, loss_fn, segment, variables, inputs, valid=None):
        loss, out = loss_fn(inputs)
        grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
        return out, [torch.zeros_like(v.value) if g is None else g
                     for g, v in zip(grads, variables)]

    def stop_gradient(self, outputs, after):
        return rule.stop_gradient_structure(outputs, lambda t: t.detach())

    def apply(self, grads, variables, step=None):
        with torch.no_grad():
            self.model.optimizer.apply(grads, variables)

    def run(self, function, when=None):
        return function()


def train_step(model, data):
    inputs, labels_onehot = rule.split_batch(model, data)
    return rule.train(model, TorchExecutor(model), inputs, labels_onehot)


def test_step(model, data):
    inputs, labels_onehot = rule.split_batch(model, data)
    return rule.evaluate(model, TorchExecutor(model), inputs, labels_onehot)
