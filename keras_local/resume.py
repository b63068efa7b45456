"""Where a resumed run continues, decided from what is on disk.

A run directory may hold, after a crash at any point of an epoch end (callbacks run in
the order checkpoint -> history row -> TensorBoard -> backup):

  backup/                  Keras BackupAndRestore: weights + optimiser after epoch e_b
  checkpoints/last.keras   the whole model after epoch e_c >= e_b, with e_c recorded inside
                           (``CHECKPOINT_STATE``)
  history.csv              one row per epoch that reached the CSV logger

``restore`` loads the newest *readable* state into the model: the backup, else the
checkpoint (with a one-line notice), else nothing (start over, with a notice), and cuts
``history.csv`` back to the epochs before that state, so no row is ever duplicated.
"""

import csv
import dataclasses
import io
import json
import os
import shutil
import zipfile

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
            state = json.loads(archive.read(CHECKPOINT_STATE)[:4096])
        epochs = state["epochs_completed"]
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"no epoch count recorded ({type(error).__name__})") from None
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"bad epoch count {epochs!r}")
    return epochs


def restore(run_dir, model, epochs):
    """Load the newest readable training state of ``run_dir`` into ``model`` (built and
    compiled); returns the ResumePoint. An unreadable backup is removed so that Keras's
    BackupAndRestore does not stumble on it."""
    notice = None
    if os.path.exists(os.path.join(run_dir, "backup")):
        try:
            point = ResumePoint(_load_backup(run_dir, model), "backup")
            truncate_history(os.path.join(run_dir, HISTORY), point.epochs_completed)
            return point
        except Exception as error:  # h5py, JSON, shape mismatch: all mean "unusable"
            shutil.rmtree(os.path.join(run_dir, "backup"), ignore_errors=True)
            notice = f"backup/ unreadable ({_reason(error)}), removed"
    else:
        notice = "no backup/"
    checkpoint = os.path.join(run_dir, CHECKPOINT)
    try:
        completed = min(checkpoint_epochs(checkpoint), epochs)
        _build_optimizer(model)
        model.load_weights(checkpoint)
        point = ResumePoint(completed, "checkpoint",
                            f"{notice}; continuing from {CHECKPOINT} after epoch {completed}")
    except Exception as error:
        if os.path.exists(checkpoint):
            detail = f"{CHECKPOINT} unusable ({_reason(error)})"
        else:
            detail = f"no {CHECKPOINT}"
        point = ResumePoint(0, "start", f"{notice}, {detail}; starting again from epoch 1")
    truncate_history(os.path.join(run_dir, HISTORY), point.epochs_completed)
    return point


def _load_backup(run_dir, model):
    with open(os.path.join(run_dir, BACKUP_METADATA)) as stream:
        epochs = json.load(stream)["epoch"]
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


def truncate_history(path, epochs_completed):
    """Keep only the rows of epochs before ``epochs_completed`` (0-based ``epoch`` column),
    rewritten atomically; the rows of the epochs about to be retrained are dropped."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as stream:
        text = stream.read()
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or "epoch" not in rows[0]:
        return
    column = rows[0].index("epoch")
    kept = [rows[0]] + [row for row in rows[1:]
                        if len(row) > column and _is_int(row[column])
                        and int(row[column]) < epochs_completed]
    if len(kept) == len(rows):
        return
    temporary = path + ".tmp"
    with open(temporary, "w", newline="") as stream:
        csv.writer(stream).writerows(kept)  # Keras CSVLogger: excel dialect
    os.replace(temporary, path)


def _is_int(text):
    try:
        int(text)
        return True
    except ValueError:
        return False
