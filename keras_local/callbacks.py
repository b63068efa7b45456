"""Keras callbacks of a training run: LR milestones, NaN guard, atomic checkpoints,
and a progress bar that keeps per-block metrics out of the way."""

import math
import os

import keras

from keras_local.optim import milestone_learning_rate


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def milestone_scheduler(config):
    """Sets lr = config.lr * lr_decay_fact ** (milestones passed) at each epoch start."""
    return keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: milestone_learning_rate(config, epoch))


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss by raising NonFiniteLossError.

    Raising (instead of Keras's TerminateOnNaN, which lets the epoch end) means no
    epoch-end callback runs: the checkpoint and the backup of the last good epoch stay.
    """

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"loss became {float(loss)} in epoch {self.epoch + 1}, batch {batch + 1}")


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the whole model (weights, optimiser state, config) to ``path`` after every
    epoch: written to a temporary name first, then renamed, so a crash mid-save never
    leaves a half-written checkpoint."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        save_model_atomically(self.model, self.path)


def save_model_atomically(model, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path[: -len(".keras")] + ".partial.keras"
    model.save(temporary)
    os.replace(temporary, path)


def is_block_metric(name):
    return name.startswith(("block_", "val_block_"))


class CompactProgbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar showing loss, error and validation numbers, with the
    per-block metrics printed as one line per block at the end of each epoch."""

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, _without_blocks(logs))

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, _without_blocks(logs))
        if self.verbose:
            for line in block_summary(logs or {}):
                print(line)


def _without_blocks(logs):
    return {k: v for k, v in (logs or {}).items() if not is_block_metric(k)}


def block_summary(logs):
    """'block_3: pred_loss=0.4412 sim_loss=0.0452 error=14.84%' lines from epoch logs."""
    blocks = {}
    for key, value in logs.items():
        if key.startswith("block_"):
            block, _, metric = key.partition("_")[2].partition("_")
            blocks.setdefault(int(block), {})[metric] = float(value)
    lines = []
    for index in sorted(blocks):
        parts = [f"{name}={value:.4f}" for name, value in sorted(blocks[index].items())
                 if name != "error"]
        if "error" in blocks[index]:
            parts.append(f"error={blocks[index]['error']:.2f}%")
        lines.append(f"  block_{index}: " + " ".join(parts))
    return lines
