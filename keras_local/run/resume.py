"""Where a resumed run continues, decided from what is on disk.

A run directory may hold, after a crash at any point of an epoch end (callbacks run in
the order checkpoint -> history row -> TensorBoard -> backup):

  backup/                  Keras BackupAndRestore: weights + optimiser after epoch e_b
  checkpoints/last.keras   the whole model after epoch e_c >= e_b, with e_c recorded inside
                           (``CHECKPOINT_STATE``)
  history.csv              one row per epoch that reached the CSV logger

``restore`` reads these and loads the newest *readable* state into the model: the
backup, else the checkpoint (with a one-line notice; an unreadable backup is moved aside
to ``backup.unreadable``, never deleted), else, only when no epoch was ever recorded,
nothing (epoch 1). Only once a state is loaded does it write: ``history.csv`` is cut back
to the epochs before that state, so no row is ever duplicated. When nothing can be loaded
(config.json changed, corrupt files, out of memory) it raises ResumeError and has written
nothing: starting over is the user's choice (a new run), never a fallback.
"""

import csv
import dataclasses
import io
import json
import os
import zipfile

from keras_local.run.json_files import parse_json_bytes, read_json_file, write_atomically

CHECKPOINT_STATE = "keras_local_state.json"  # extra member of checkpoints/last.keras
BACKUP_WEIGHTS = os.path.join("backup", "latest.weights.h5")
BACKUP_METADATA = os.path.join("backup", "training_metadata.json")
CHECKPOINT = os.path.join("checkpoints", "last.keras")
HISTORY = "history.csv"


@dataclasses.dataclass
class ResumePoint:
    epochs_completed: int
    source: str            # "backup", "checkpoint" or "start"
    notice: str = None     # one line for the user when not resuming from the backup


def record_checkpoint_epochs(path, epochs_completed):
    """Write the number of completed epochs into the ``.keras`` archive at ``path``
    (before it is renamed into place: the model and its epoch are one file)."""
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(CHECKPOINT_STATE, json.dumps({"epochs_completed": epochs_completed}))


def checkpoint_epochs(path):
    """The completed epochs recorded in a checkpoint (ValueError if absent or unreadable)."""
    try:
        with zipfile.ZipFile(path) as archive:
            state = parse_json_bytes(archive.read(CHECKPOINT_STATE)[:4096], CHECKPOINT_STATE)
        epochs = state["epochs_completed"]
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"no epoch count recorded ({type(error).__name__})") from None
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"bad epoch count {epochs!r}")
    return epochs


class ResumeError(ValueError):
    """The run cannot continue from what is on disk; nothing was written (one line)."""


def restore(run_dir, model, epochs):
    """Load the newest readable training state of ``run_dir`` into ``model`` (built and
    compiled); returns the ResumePoint, or raises ResumeError having written nothing."""
    backup = os.path.join(run_dir, "backup")
    checkpoint = os.path.join(run_dir, CHECKPOINT)
    backup_error = None
    changed = config_changes(checkpoint, model) if os.path.exists(checkpoint) else ""
    if changed:
        raise ResumeError(f"cannot resume {run_dir}: config.json differs from {CHECKPOINT} "
                          f"in {changed} (checkpoint -> config.json); put config.json back "
                          f"or start a new run{_NOTHING_CHANGED}")
    if os.path.exists(backup):
        try:
            point = ResumePoint(_load_backup(run_dir, model), "backup")
        except Exception as error:  # h5py, JSON, shape mismatch, memory
            _refuse_if_out_of_memory(run_dir, "backup/", error)
            backup_error = error
        else:
            truncate_history(os.path.join(run_dir, HISTORY), point.epochs_completed)
            return point
    if not os.path.exists(checkpoint):
        if backup_error is not None:
            raise ResumeError(f"cannot resume {run_dir}: backup/ unreadable "
                              f"({_reason(backup_error)}) and no {CHECKPOINT}{_NOTHING_CHANGED}")
        recorded = len(_history_rows(os.path.join(run_dir, HISTORY))[1])
        if recorded:
            raise ResumeError(f"cannot resume {run_dir}: history.csv records {recorded} "
                              f"epochs but there is no backup/ or {CHECKPOINT} to continue "
                              f"from{_NOTHING_CHANGED}")
        return ResumePoint(0, "start", f"no {CHECKPOINT} yet (stopped in epoch 1): "
                                       f"starting from epoch 1")
    try:
        completed = min(checkpoint_epochs(checkpoint), epochs)
        _build_optimizer(model)
        model.load_weights(checkpoint)
    except Exception as error:
        _refuse_if_out_of_memory(run_dir, CHECKPOINT, error)
        found = "" if backup_error is None else \
            f"backup/ unreadable ({_reason(backup_error)}) and "
        raise ResumeError(f"cannot resume {run_dir}: {found}{CHECKPOINT} unusable "
                          f"({_reason(error)}){_NOTHING_CHANGED}") from None
    notice = "no backup/"
    if backup_error is not None:
        kept = _move_aside(backup)
        notice = (f"backup/ unreadable ({_reason(backup_error)}), kept as "
                  f"{os.path.basename(kept)}")
    truncate_history(os.path.join(run_dir, HISTORY), completed)
    return ResumePoint(completed, "checkpoint",
                       f"{notice}; continuing from {CHECKPOINT} after epoch {completed}")


_NOTHING_CHANGED = "; nothing was changed"


def config_changes(checkpoint, model):
    """'field old -> new, ...' where the network stored in ``checkpoint`` differs from
    ``model`` (built from config.json); '' when they agree or the checkpoint's config
    cannot be read (loading it then reports why)."""
    from keras_local.run.model_files import ModelFileError, read_keras_config

    try:
        stored = read_keras_config(checkpoint)["config"]
        old = {**stored["config"], **{key: stored[key] for key in
                                      ("architecture", "input_shape", "num_classes")}}
    except (ModelFileError, KeyError, TypeError):
        return ""
    current = model.get_config()
    new = json.loads(json.dumps({**current["config"], **{
        key: current[key] for key in ("architecture", "input_shape", "num_classes")}}))
    return ", ".join(f"{key} {old[key]!r} -> {new[key]!r}" for key in sorted(old)
                     if key in new and old[key] != new[key])


def _refuse_if_out_of_memory(run_dir, what, error):
    # Memory is not a property of the files: falling back to an older state would hide it.
    if isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError":
        raise ResumeError(f"cannot resume {run_dir}: out of memory while restoring {what} "
                          f"({_reason(error)}){_NOTHING_CHANGED}") from None


def _move_aside(folder):
    """Rename ``folder`` to a free ``<folder>.unreadable[-N]`` name; returns it."""
    target, number = f"{folder}.unreadable", 1
    while os.path.exists(target):
        number += 1
        target = f"{folder}.unreadable-{number}"
    os.rename(folder, target)
    return target


def _load_backup(run_dir, model):
    epochs = read_json_file(os.path.join(run_dir, BACKUP_METADATA))["epoch"]
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"bad epoch {epochs!r}")
    _build_optimizer(model)
    model.load_weights(os.path.join(run_dir, BACKUP_WEIGHTS))
    return epochs


def _build_optimizer(model):
    # Unbuilt, the optimiser has no slots and Keras skips loading them (with a warning).
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _reason(error):
    text = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _history_rows(path):
    """The header of history.csv and its rows with an integer ``epoch`` column (or
    ``None, []`` when there is no such file or column)."""
    if not os.path.isfile(path):
        return None, []
    with open(path, newline="") as stream:
        rows = list(csv.reader(io.StringIO(stream.read())))
    if not rows or "epoch" not in rows[0]:
        return None, []
    column = rows[0].index("epoch")
    return rows[0], [row for row in rows[1:] if len(row) > column and _is_int(row[column])]


def truncate_history(path, epochs_completed):
    """Keep only the rows of epochs before ``epochs_completed`` (0-based ``epoch`` column),
    rewritten atomically; the rows of the epochs about to be retrained are dropped."""
    header, rows = _history_rows(path)
    if header is None:
        return
    column = header.index("epoch")
    kept = [header] + [row for row in rows if int(row[column]) < epochs_completed]
    if len(kept) == len(rows) + 1:
        return

    def write(temporary):
        with open(temporary, "w", newline="") as stream:
            csv.writer(stream).writerows(kept)  # Keras CSVLogger: excel dialect

    write_atomically(path, write)


def _is_int(text):
    try:
        int(text)
        return True
    except ValueError:
        return False
