"""Optimisers and the milestone learning-rate schedule of the reference."""

import bisect

import keras


def make_optimizer(config):
    """Adam / AMSGrad / SGD(+momentum) with PyTorch's epsilon (1e-8).

    Weight decay is the reference's coupled L2 (added to the gradient by the train
    step), not Keras's decoupled ``weight_decay``, so it is not set here.
    """
    if config.optim in ("adam", "amsgrad"):
        return keras.optimizers.Adam(learning_rate=config.lr, epsilon=1e-8,
                                     amsgrad=config.optim == "amsgrad")
    if config.optim == "sgd":
        return keras.optimizers.SGD(learning_rate=config.lr, momentum=config.momentum)
    raise ValueError(f"unknown optim {config.optim!r}; choose one of adam, amsgrad, sgd")


def milestone_learning_rate(config, epoch):
    """Learning rate of 0-based ``epoch``: lr * fact ** (number of milestones <= epoch).

    Same as the reference's ``lr * fact ** bisect_right(milestones, epoch - 1)`` with
    its 1-based epochs.
    """
    decays = bisect.bisect_right(list(config.lr_decay_milestones), epoch)
    return config.lr * config.lr_decay_fact**decays
