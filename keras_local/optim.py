"""Optimisers and the milestone learning-rate schedule of the reference."""

import bisect

import keras

from keras_local.optimizers import TorchAdam, TorchSGD


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
