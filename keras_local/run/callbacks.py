"""Keras callbacks of a training run: LR milestones, NaN guard, atomic checkpoints,
epoch times, a progress bar that keeps per-block metrics out of the way, TensorBoard scalars
grouped per block, and TensorBoard pictures of the blocks' similarity matrices and the run's
HParams."""

import math
import os
import re
import time

import keras
import numpy as np

from keras_local.config import HPARAM_FIELDS
from keras_local.optimizers import milestone_learning_rate


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

    def __init__(self, run_dir=None):
        super().__init__()
        self.epoch = 0
        self.run_dir = run_dir

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"loss became {float(loss)} in epoch {self.epoch + 1}, batch {batch + 1}"
                + self._what_is_kept())

    def _what_is_kept(self):
        """Names only files that exist: in the first epoch no checkpoint was written."""
        if self.run_dir is None:
            return ""
        checkpoint = os.path.join(self.run_dir, "checkpoints", "last.keras")
        if os.path.isfile(checkpoint):
            return (f"; stopped, the last good epoch is kept ({checkpoint}, resumable with "
                    f"--resume {self.run_dir})")
        return "; stopped before any epoch completed: no checkpoint was written"


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the whole model (weights, optimiser state, config) to ``path`` after every
    epoch: written to a temporary name first, then renamed, so a crash mid-save never
    leaves a half-written checkpoint."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        save_model_atomically(self.model, self.path, epochs_completed=epoch + 1)


def save_model_atomically(model, path, epochs_completed=None):
    """``model.save(path)`` whole or not at all (``json_files.write_atomically``: a full
    disk raises WriteError and leaves the previous file); ``epochs_completed`` is recorded
    inside the archive (``keras_local.run.resume``), so a model and its epoch never disagree."""
    from keras_local.run.json_files import WriteError, write_atomically

    def write(temporary):
        model.save(temporary)
        if epochs_completed is not None:
            from keras_local.run.resume import record_checkpoint_epochs

            record_checkpoint_epochs(temporary, epochs_completed)

    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    except OSError as error:
        raise WriteError(error.errno, f"cannot write {path}: {error.strerror or error}") from None
    write_atomically(path, write)


class EpochTimes(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` to every epoch's logs (history.csv; TensorBoard tag
    ``EPOCH_TIME_TAG``): the wall time of one whole epoch, its data pipeline, steps and
    validation included. It is measured from the same point of the previous epoch's end,
    so it also holds the work other callbacks do between epochs (checkpoint, backup, logs);
    the first epoch of a ``fit`` is measured from its start. Must come before the callbacks
    that write the logs."""

    def on_train_begin(self, logs=None):
        self.mark = None

    def on_epoch_begin(self, epoch, logs=None):
        if getattr(self, "mark", None) is None:
            self.mark = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        if logs is not None:
            logs["epoch_seconds"] = now - self.mark
        self.mark = now


class RandomStreams(keras.callbacks.Callback):
    """Makes every random stream of a training step a function of (seed, epoch, step), so
    that a run resumed after a crash draws exactly what the uninterrupted run drew:

    - ``clock.epoch`` tells the data pipeline which epoch it feeds (tf.data's
      ``reshuffle_each_iteration`` counts the epochs of this process, not of the run);
    - before every step each SeedGenerator (dropout) is set to (its seed, step * stride):
      Keras saves no SeedGenerator state in checkpoints or backups.
    Must come first in the callback list (before the epoch's data is read)."""

    STRIDE = 1 << 16  # draws one generator may make in one step

    def __init__(self, clock=None):
        super().__init__()
        self.clock = clock
        self.generators = []

    def on_train_begin(self, logs=None):
        if keras.backend.backend() == "jax":
            return  # JAX's fit() carries the variables itself between its syncs
        self.generators = [(v, int(v.numpy()[0]))
                           for v in self.model.non_trainable_variables
                           if v.path.endswith("seed_generator_state")]

    def on_epoch_begin(self, epoch, logs=None):
        if self.clock is not None:
            self.clock.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if not self.generators:
            return
        step = int(self.model.optimizer.iterations.numpy())
        for variable, seed in self.generators:
            variable.assign(np.asarray([seed, step * self.STRIDE], dtype=variable.dtype))


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


EPOCH_TIME_TAG = "time/epoch_seconds"


def tensorboard_tag(keras_tag):
    """The tag under which a scalar that Keras's TensorBoard callback names ``keras_tag``
    is written. TensorBoard makes one section of every prefix before a ``/``, so a block's
    epoch metrics go under ``block_k/`` (``epoch_block_2_sim_loss`` -> ``block_2/sim_loss``),
    the epoch time under ``EPOCH_TIME_TAG``; every other tag keeps Keras's name
    (``epoch_loss``, ``epoch_learning_rate``)."""
    if keras_tag == "epoch_epoch_seconds":
        return EPOCH_TIME_TAG
    block = re.fullmatch(r"epoch_(block_\d+)_(.+)", keras_tag)
    return f"{block[1]}/{block[2]}" if block else keras_tag


class _RenamedScalars:
    """``tf.summary`` whose ``scalar`` writes under ``tensorboard_tag(name)``."""

    def __init__(self, summary):
        self._summary = summary

    def __getattr__(self, name):
        return getattr(self._summary, name)

    def scalar(self, name, *args, **kwargs):
        return self._summary.scalar(tensorboard_tag(name), *args, **kwargs)


class GroupedTensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback (``train/`` and ``validation/`` runs under ``log_dir``)
    with the scalar tags of ``tensorboard_tag``: one section per block. Only the tags
    change; the logs (history.csv, results.json, resume) keep Keras's metric names."""

    @property
    def summary(self):
        # Keras writes every scalar through this module, so renaming here changes the
        # tags without re-implementing the callback.
        return _RenamedScalars(super().summary)


def class_sorted_sample(labels, size):
    """Indices of ``size`` examples, classes as balanced as ``labels`` allows, sorted by
    class (stable): the first example of every class, then the second, and so on."""
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), dtype=np.int64)  # how many earlier examples share the class
    for value in np.unique(labels):
        where = np.flatnonzero(labels == value)
        rank[where] = np.arange(len(where))
    round_robin = np.lexsort((labels, rank))[:size]
    return round_robin[np.argsort(labels[round_robin], kind="stable")]


def similarity_picture(similarity, label_similarity, scale=4):
    """Two (B, B) similarity matrices side by side as one RGB uint8 image of shape
    (B * scale, 2 * B * scale + 2 * scale, 3); colours: red +1, white 0, blue -1."""
    from matplotlib import colormaps

    colour = colormaps["RdBu_r"]
    gap = np.full((len(similarity), 2, 4), 1.0)
    values = np.concatenate([colour((np.asarray(similarity) + 1.0) / 2.0), gap,
                             colour((np.asarray(label_similarity) + 1.0) / 2.0)], axis=1)
    values = np.repeat(np.repeat(values[..., :3], scale, axis=0), scale, axis=1)
    return np.round(values * 255).astype(np.uint8)


class SimilarityImages(keras.callbacks.Callback):
    """TensorBoard images of what each block learns (TensorFlow backend).

    After every epoch, for every local block: the similarity matrix S(h) of the block's
    output h (inference mode; a residual conv's main-path output, not the skip it carries)
    on a fixed batch of test images sorted by class, beside the
    label similarity S(onehot(y)) that the sim loss pulls it towards. Tag
    ``similarity/<block name>`` (e.g. ``similarity/block_1``), step = epoch (from 0), in
    ``log_dir``. ``images`` are normalised model inputs.
    """

    def __init__(self, log_dir, images, labels, num_classes, scale=4):
        super().__init__()
        from keras_local.losses.maths import similarity_matrix

        self.log_dir = log_dir
        self.images = images
        self.scale = scale
        onehot = np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]
        self.label_similarity = keras.ops.convert_to_numpy(similarity_matrix(onehot))
        self.writer = None

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        self.writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        from keras_local.layers.block import LocalBlock
        from keras_local.losses.maths import similarity_matrix

        h = self.images
        with self.writer.as_default():
            for layer in self.model.feature_layers:
                h = layer(h, training=False)
                if isinstance(layer, LocalBlock):
                    # Residual convs pass (output, block input) on to the next conv.
                    output = h[0] if isinstance(h, (tuple, list)) else h
                    similarity = keras.ops.convert_to_numpy(similarity_matrix(output))
                    picture = similarity_picture(similarity, self.label_similarity, self.scale)
                    tf.summary.image(f"similarity/{layer.name}", picture[None], step=epoch,
                                     description="left: similarity of the block's output "
                                                 "on test images sorted by class; right: "
                                                 "label similarity (red +1, blue -1)")
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()


def hparam_values(config):
    """The run's ``HPARAM_FIELDS`` (the options that define the experiment: no paths, class
    names or data statistics, none of the execution choices that leave the method
    unchanged) and ``training_mode`` (which stands for backprop and no_detach) as
    TensorBoard HParams values
    (bool, int, float or str; sequences become text). Left out: options that are None, and
    options that act only through another one that is off (``length`` without cutout,
    ``momentum`` without sgd, ...), so that a column means something wherever it is set."""
    idle = {"length": not config.cutout,
            "classes_per_batch_until_epoch": not config.classes_per_batch,
            "target_proj_size": not config.bio,
            "momentum": config.optim != "sgd"}
    values = {"training_mode": config.training_mode}
    for name in HPARAM_FIELDS:
        value = getattr(config, name)
        if value is None or idle.get(name):
            continue
        values[name] = value if isinstance(value, (bool, int, float, str)) else \
            " ".join(map(str, value))
    return values


class HParamsSummary(keras.callbacks.Callback):
    """Writes the options that define the run (``hparam_values``) to TensorBoard's HParams
    dashboard (TensorFlow installed), so that runs can be compared and filtered by them."""

    def __init__(self, log_dir, config, trial_id):
        super().__init__()
        self.log_dir = log_dir
        self.config = config
        self.trial_id = trial_id

    def on_train_begin(self, logs=None):
        import tensorflow as tf
        from tensorboard.plugins.hparams import api as hp

        writer = tf.summary.create_file_writer(self.log_dir)
        with writer.as_default():
            hp.hparams(hparam_values(self.config), trial_id=self.trial_id)
        writer.close()
