"""The reference's optimisers and learning-rate schedule: PyTorch's Adam / AMSGrad and SGD
as Keras optimisers (``make_optimizer``), and the milestone decay (``milestone_learning_rate``).

Two differences from Keras's own optimisers, both of which change the weights:
- Adam's epsilon. torch.optim.Adam divides by ``sqrt(v_t) / sqrt(1 - beta_2^t) + eps``
  (epsilon after bias correction); Keras's Adam by ``sqrt(v_t) + eps``, i.e. an epsilon
  of ``eps / sqrt(1 - beta_2^t)`` in PyTorch's terms (3.2e-7 at step 1 for 1e-8).
- Weight decay. torch.optim's ``weight_decay`` is coupled L2: the gradient becomes
  ``g + weight_decay * w`` before the update (moments included). Keras's
  ``weight_decay`` is decoupled (AdamW-style), so these classes take
  ``coupled_weight_decay`` instead and leave Keras's ``weight_decay`` unset.
And SGD's momentum: torch keeps ``buf = momentum * buf + g`` and steps ``-lr * buf``;
Keras keeps ``velocity = momentum * velocity - lr * g``, which differs once the learning
rate changes (the milestone decays).

Both are ordinary ``keras.optimizers.Optimizer`` subclasses: ``update_step`` reads
``self.iterations`` as Keras's Adam does, so they run on every backend, inside
``tf.function(jit_compile=True)``, under tf.distribute, and save/load by name. On
TensorFlow without a strategy each variable's update is one fused kernel
(``keras_local.kernels.tensorflow.fused_updates``: same formulas, fewer passes over memory).
"""

import bisect

import keras
from keras import ops

from keras_local.kernels import fast_paths


@keras.saving.register_keras_serializable(package="keras_local")
class TorchAdam(keras.optimizers.Optimizer):
    """torch.optim.Adam (``amsgrad=True``: its AMSGrad) with coupled L2 weight decay.

    Per variable w with gradient g at step t = iterations + 1:
        g = g + coupled_weight_decay * w
        m = beta_1 m + (1 - beta_1) g;   v = beta_2 v + (1 - beta_2) g^2
        v_max = max(v_max, v)            (amsgrad; v_max replaces v below)
        w = w - lr / (1 - beta_1^t) * m / (sqrt(v) / sqrt(1 - beta_2^t) + epsilon)
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 amsgrad=False, coupled_weight_decay=0.0, name="adam", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = amsgrad
        self.coupled_weight_decay = coupled_weight_decay

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._momentums, self._velocities = self.add_optimizer_variables(
            variables, ["momentum", "velocity"])
        if self.amsgrad:
            self._velocity_maxima = self.add_optimizer_variables(variables, "velocity_max")

    def update_step(self, gradient, variable, learning_rate):
        self.update_step_at(gradient, variable, learning_rate, self.iterations + 1)

    def update_step_at(self, gradient, variable, learning_rate, step):
        """``update_step`` at step t = ``step`` (a caller that updates many variables in
        one training step may read the counter once: the pipelined step, once per stage,
        on the stage's device)."""
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        v_max = self._velocity_maxima[index] if self.amsgrad else None
        fused = _fused_kernels(variable, m, v, v_max)
        if fused is not None:
            kernels, (variable, m, v, v_max) = fused
            kernels.adam(variable, m, v, v_max, gradient, learning_rate, step,
                         self.beta_1, self.beta_2, self.epsilon, self.coupled_weight_decay)
            return
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = _coupled_decay(gradient, variable, self.coupled_weight_decay)
        step = ops.cast(step, dtype)
        correction_1 = 1 - ops.power(ops.cast(self.beta_1, dtype), step)
        correction_2 = 1 - ops.power(ops.cast(self.beta_2, dtype), step)
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (ops.square(gradient) - v) * (1 - self.beta_2))
        if self.amsgrad:
            self.assign(v_max, ops.maximum(v_max, v))
            v = v_max
        denominator = ops.sqrt(v) / ops.sqrt(correction_2) + self.epsilon
        self.assign_sub(variable, (lr / correction_1) * m / denominator)

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon, "amsgrad": self.amsgrad,
                "coupled_weight_decay": self.coupled_weight_decay}


@keras.saving.register_keras_serializable(package="keras_local")
class TorchSGD(keras.optimizers.Optimizer):
    """torch.optim.SGD (dampening 0, no Nesterov) with coupled L2 weight decay.

        g = g + coupled_weight_decay * w
        buf = momentum * buf + g   (buf = g at the first step; no buffer without momentum)
        w = w - lr * buf
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, coupled_weight_decay=0.0,
                 name="sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.coupled_weight_decay = coupled_weight_decay

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._buffers = []
        if self.momentum:
            self._buffers = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        buffer = self._buffers[self._get_variable_index(variable)] if self.momentum else None
        fused = _fused_kernels(variable, buffer)
        if fused is not None:
            kernels, (variable, buffer) = fused
            kernels.sgd(variable, buffer, gradient, learning_rate, self.momentum,
                        self.coupled_weight_decay)
            return
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = _coupled_decay(gradient, variable, self.coupled_weight_decay)
        if self.momentum:
            # Zero-initialised, so the first step leaves buf = g as torch's clone does.
            self.assign(buffer, ops.cast(self.momentum, dtype) * buffer + gradient)
            gradient = buffer
        self.assign_sub(variable, lr * gradient)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum,
                "coupled_weight_decay": self.coupled_weight_decay}


def _fused_kernels(*variables):
    """(the fused update kernels, the backend variables behind ``variables``) where a fast
    path updates them (``keras_local.kernels``); None for the backend-agnostic ops. None
    entries (absent slots) pass through."""
    return fast_paths().fused_updates(*variables)


def _coupled_decay(gradient, variable, weight_decay):
    """PyTorch's L2 weight decay, added to the gradient: g + weight_decay * w."""
    gradient = ops.cast(gradient, variable.dtype)
    if weight_decay:
        gradient = gradient + ops.cast(weight_decay, variable.dtype) * variable
    return gradient

def make_optimizer(config):
    """The reference's optimiser: PyTorch's Adam / AMSGrad / SGD(+momentum) with its
    coupled L2 weight decay (``keras_local.optimizers``); "keras_adam" is Keras's own
    Adam (epsilon before bias correction), which has no coupled weight decay.
    """
    if config.optim in ("adam", "amsgrad"):
        return TorchAdam(learning_rate=config.lr, epsilon=1e-8,
                         amsgrad=config.optim == "amsgrad",
                         coupled_weight_decay=config.weight_decay)
    if config.optim == "sgd":
        return TorchSGD(learning_rate=config.lr, momentum=config.momentum,
                        coupled_weight_decay=config.weight_decay)
    if config.optim == "keras_adam":  # Config refuses weight_decay with it
        return keras.optimizers.Adam(learning_rate=config.lr, epsilon=1e-8)
    raise ValueError(f"unknown optim {config.optim!r}; "
                     f"choose one of adam, amsgrad, sgd, keras_adam")


def milestone_learning_rate(config, epoch):
    """Learning rate of 0-based ``epoch``: lr * fact ** (number of milestones <= epoch).

    Same as the reference's ``lr * fact ** bisect_right(milestones, epoch - 1)`` with
    its 1-based epochs.
    """
    decays = bisect.bisect_right(list(config.lr_decay_milestones), epoch)
    return config.lr * config.lr_decay_fact**decays
