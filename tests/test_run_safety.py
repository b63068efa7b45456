"""Nothing a user owns is deleted or truncated (docs/reliability.md): a resume that cannot
restore stops before writing, a run directory is held by one process, an export replaces only
an export, and a full disk or an unwritable place is one line with the last checkpoint kept."""

import errno
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

import keras_local as kl

from helpers import history_epochs, one_line_error, train_main

# Every option at its default but the size of the run (similarity images stay on).
TINY = ["--dataset", "fashion_mnist_demo", "--model", "mlp", "--num-layers", "1",
        "--num-hidden", "32", "--max-train-examples", "256", "--batch-size", "64",
        "--epochs", "3", "--no-export", "--quiet"]


def digest(folder):
    """Every file's sha256 and every folder's name under ``folder``."""
    found = {}
    for parent, folders, files in os.walk(folder):
        for name in folders:
            found[os.path.relpath(os.path.join(parent, name), folder)] = "folder"
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as stream:
                found[os.path.relpath(path, folder)] = hashlib.sha256(stream.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped (Ctrl-C) in epoch 2 of 3: backup/ and checkpoints/ of epoch 1,
    history.csv with one row, logs/."""
    from keras_local.run.callbacks import NaNGuard

    save_dir = tmp_path_factory.mktemp("interrupted")

    def stop_in_epoch_2(self, batch, logs=None):
        if self.epoch == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NaNGuard, "on_train_batch_begin", stop_in_epoch_2, raising=False)
        assert train_main([*TINY, "--save-dir", str(save_dir)]) == 130
    (run_dir,) = save_dir.iterdir()
    for name in ("backup", "checkpoints/last.keras", "history.csv", "logs"):
        assert (run_dir / name).exists(), name
    return run_dir


@pytest.fixture
def run_copy(interrupted, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(interrupted, target)
    return target


def test_an_interrupted_run_closes_its_files(tmp_path):
    """Ctrl-C inside fit: Keras skips on_train_end, which closes history.csv."""
    from keras_local.run.callbacks import NaNGuard

    def stop_in_epoch_2(self, batch, logs=None):
        if self.epoch == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        patch.setattr(NaNGuard, "on_train_batch_begin", stop_in_epoch_2, raising=False)
        assert train_main([*TINY, "--save-dir", str(tmp_path)]) == 130
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed


# ------------------------------------------------------------------------------ resume
def test_resume_continues_an_interrupted_run(run_copy, capsys):
    assert train_main(["--resume", str(run_copy), "--quiet", "--no-export"]) == 0
    assert history_epochs(run_copy) == [0, 1, 2]
    assert (run_copy / "results.json").is_file() and not (run_copy / "backup").exists()


def test_resume_after_a_config_change_names_the_fields_and_writes_nothing(run_copy, capsys):
    path = run_copy / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "num_hidden": 33, "nonlin": "leakyrelu"}))
    before = digest(run_copy)
    assert train_main(["--resume", str(run_copy), "--quiet", "--no-export"]) == 2
    err = one_line_error(capsys)
    assert "num_hidden 32 -> 33" in err and "nonlin 'relu' -> 'leakyrelu'" in err, err
    assert digest(run_copy) == before


@pytest.mark.parametrize("damage", ["checkpoint_and_backup", "checkpoint_without_backup"])
def test_resume_from_corrupt_files_refuses_and_writes_nothing(run_copy, capsys, damage):
    (run_copy / "checkpoints" / "last.keras").write_bytes(b"PK\x03\x04 not a zip")
    if damage == "checkpoint_and_backup":
        (run_copy / "backup" / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    else:
        shutil.rmtree(run_copy / "backup")
    before = digest(run_copy)
    assert train_main(["--resume", str(run_copy), "--quiet", "--no-export"]) == 2
    err = one_line_error(capsys)
    assert "cannot resume" in err and "checkpoints/last.keras" in err, err
    assert digest(run_copy) == before


def test_resume_out_of_memory_while_restoring_refuses(run_copy, capsys, monkeypatch):
    from keras_local.models.local_model import LocalModel

    def out_of_memory(self, *args, **kwargs):
        raise MemoryError("Unable to allocate 8.00 GiB")

    monkeypatch.setattr(LocalModel, "load_weights", out_of_memory)
    before = digest(run_copy)
    assert train_main(["--resume", str(run_copy), "--quiet", "--no-export"]) == 2
    err = one_line_error(capsys)
    assert "out of memory" in err and "backup/" in err, err
    assert digest(run_copy) == before


def test_unreadable_backup_is_kept_aside_when_the_checkpoint_restores(tmp_path):
    from keras_local.run.callbacks import save_model_atomically
    from keras_local.run.resume import restore

    model = kl.build_model("mlp", (4,), 3, kl.Config(num_hidden=8))
    model.compile()
    # A checkpoint of a run that trained: its optimizer holds all its variables (one saved
    # before the first step holds 2 of 20, and Keras warns when loading it).
    model.train_on_batch(np.zeros((8, 4), "float32"), np.zeros(8, "int32"))
    save_model_atomically(model, str(tmp_path / "checkpoints" / "last.keras"),
                          epochs_completed=2)
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "latest.weights.h5").write_bytes(b"truncated")
    (tmp_path / "history.csv").write_text("epoch,loss\r\n0,1.0\r\n1,0.5\r\n2,0.4\r\n")
    point = restore(str(tmp_path), model, epochs=4)
    assert (point.source, point.epochs_completed) == ("checkpoint", 2)
    assert "backup/ unreadable" in point.notice and "kept as backup.unreadable" in point.notice
    assert (tmp_path / "backup.unreadable" / "latest.weights.h5").read_bytes() == b"truncated"
    assert not (tmp_path / "backup").exists()
    assert (tmp_path / "history.csv").read_bytes() == b"epoch,loss\r\n0,1.0\r\n1,0.5\r\n"


def test_history_without_a_state_to_resume_from_is_refused(tmp_path):
    from keras_local.run.resume import ResumeError, restore

    model = kl.build_model("mlp", (4,), 3, kl.Config(num_hidden=8))
    model.compile()
    (tmp_path / "history.csv").write_text("epoch,loss\r\n0,1.0\r\n1,0.5\r\n")
    with pytest.raises(ResumeError, match="history.csv records 2 epochs but there is no "
                                          "backup/ or checkpoints/last.keras"):
        restore(str(tmp_path), model, epochs=3)
    assert (tmp_path / "history.csv").read_bytes() == b"epoch,loss\r\n0,1.0\r\n1,0.5\r\n"
    (tmp_path / "history.csv").write_text("epoch,loss\r\n")  # killed in epoch 1
    point = restore(str(tmp_path), model, epochs=3)
    assert (point.source, point.epochs_completed) == ("start", 0)


# ------------------------------------------------------------------------ one process
def test_a_second_process_on_the_same_run_is_refused(run_copy, capsys):
    """Two real processes: another one holds the run's lock; train.py --resume refuses,
    and once that process dies (SIGKILL, no clean-up) the OS has released the lock."""
    from keras_local.run.training import lock_run_dir

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         "stream = open(sys.argv[1], 'a')\n"
         "fcntl.flock(stream, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "time.sleep(600)", str(run_copy / "run.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = digest(run_copy)
        assert train_main(["--resume", str(run_copy), "--quiet", "--no-export"]) == 2
        err = one_line_error(capsys)
        assert "is in use by another process" in err, err
        assert digest(run_copy) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    lock = lock_run_dir(str(run_copy))  # released by the OS with the dead process
    lock.close()


# ----------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = kl.Config(dataset="fashion_mnist", model="mlp", num_layers=1, num_hidden=8,
                       jit_compile=False)
    model = kl.build_model("mlp", (28, 28, 1), 10, config)
    model.compile()
    path = tmp_path_factory.mktemp("checkpoint") / "model.keras"
    model.save(path)
    return path


def export_main(argv):
    from export.__main__ import main

    return main([str(a) for a in argv])


@pytest.mark.parametrize("user_files", ["metadata_only", "beside_an_export", "edited_export",
                                        "old_name_beside"])
def test_overwrite_replaces_only_what_an_export_wrote(checkpoint, tmp_path, capsys,
                                                      user_files):
    out = tmp_path / "out"
    if user_files == "metadata_only":  # a folder of the user's that happens to hold one
        out.mkdir()
        (out / "metadata.json").write_text('{"author": "me"}')
    else:
        assert export_main([checkpoint, "--format", "onnx", "--out", out]) == 0
    if user_files == "edited_export":
        (out / "model.onnx").write_bytes(b"my own model")
    elif user_files == "old_name_beside":
        (tmp_path / ".out.old").mkdir()  # the name the previous export was moved to
        (tmp_path / ".out.old" / "keep.txt").write_text("mine")
    if user_files != "old_name_beside":
        (out / "thesis.txt").write_text("chapter 1")
        (out / "photos").mkdir()
        (out / "photos" / "a.jpg").write_bytes(b"\xff\xd8 photo")
    before = digest(tmp_path)
    code = export_main([checkpoint, "--format", "onnx", "--out", out, "--overwrite"])
    if user_files == "old_name_beside":
        assert code == 0
        assert (tmp_path / ".out.old" / "keep.txt").read_text() == "mine"
        assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.onnx"]
        return
    assert code == 2
    err = one_line_error(capsys)
    assert "refusing to replace" in err, err
    assert digest(tmp_path) == before


def test_overwrite_replaces_an_unchanged_export(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert export_main([checkpoint, "--format", "onnx", "--out", out]) == 0
    manifest = json.loads((out / "metadata.json").read_text())["files"]
    assert sorted(manifest) == ["model.onnx"]
    assert export_main([checkpoint, "--format", "onnx", "savedmodel", "--out", out,
                        "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.onnx",
                                                     "saved_model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_added_to_out_while_exporting_are_kept(checkpoint, tmp_path, capsys,
                                                     monkeypatch):
    from keras_local import exporting

    out = tmp_path / "out"
    assert export_main([checkpoint, "--format", "onnx", "--out", out]) == 0
    original = exporting._write_onnx

    def user_saves_a_file_meanwhile(*args):
        (out / "notes.txt").write_text("written during the export")
        return original(*args)

    monkeypatch.setattr(exporting, "_write_onnx", user_saves_a_file_meanwhile)
    assert export_main([checkpoint, "--format", "onnx", "--out", out, "--overwrite"]) == 2
    assert "notes.txt" in one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.onnx", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


# ------------------------------------------------------------------ full disk, bad places
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from keras_local.run.callbacks import save_model_atomically
    from keras_local.run.json_files import WriteError
    from keras_local.models.local_model import LocalModel
    from keras_local.run.resume import checkpoint_epochs

    model = kl.build_model("mlp", (4,), 3, kl.Config(num_hidden=8))
    model.compile()
    path = tmp_path / "checkpoints" / "last.keras"
    save_model_atomically(model, str(path), epochs_completed=1)
    good = path.read_bytes()

    def disk_full(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as stream:
            stream.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(LocalModel, "save", disk_full)
    with pytest.raises(WriteError, match="No space left on device") as error:
        save_model_atomically(model, str(path), epochs_completed=2)
    assert isinstance(error.value, OSError) and error.value.errno == errno.ENOSPC
    assert path.read_bytes() == good and checkpoint_epochs(str(path)) == 1
    assert os.listdir(path.parent) == ["last.keras"]


def test_disk_full_while_writing_json_keeps_the_previous_file(tmp_path, monkeypatch):
    from keras_local.run import json_files
    from keras_local.run.json_files import WriteError, write_json_atomically

    path = tmp_path / "results.json"
    write_json_atomically(str(path), {"test_error": 1.5})
    good = path.read_bytes()

    def disk_full(payload, stream, **kwargs):
        stream.write('{"test_err')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json_files.json, "dump", disk_full)
    with pytest.raises(WriteError, match="No space left on device"):
        write_json_atomically(str(path), {"test_error": 2.5})
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["results.json"]


def test_disk_full_during_training_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    from keras_local.models.local_model import LocalModel
    from keras_local.run.resume import checkpoint_epochs

    saves = []
    original = LocalModel.save

    def full_at_second_save(self, filepath, *args, **kwargs):
        saves.append(filepath)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))
        return original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(LocalModel, "save", full_at_second_save)
    assert train_main([*TINY, "--save-dir", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "--resume" in err, err
    (run_dir,) = tmp_path.iterdir()
    assert checkpoint_epochs(str(run_dir / "checkpoints" / "last.keras")) == 1
    assert os.listdir(run_dir / "checkpoints") == ["last.keras"]


@pytest.mark.parametrize("where", ["proc", "file", "read_only"])
def test_unwritable_save_dir_is_one_line_before_training(tmp_path, capsys, monkeypatch,
                                                         where):
    from keras_local import data
    from keras_local.run import training

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    save_dir = {"proc": "/proc/keras-local-test/runs", "file": str(blocker / "runs"),
                "read_only": str(tmp_path / "runs")}[where]
    if where == "read_only":  # root writes through chmod: the file system answers instead

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(training.tempfile, "TemporaryFile", read_only)
    loads = []
    monkeypatch.setattr(training, "load_arrays",
                        lambda *args: loads.append(args) or data.load_arrays(*args))
    assert train_main([*TINY, "--save-dir", save_dir]) == 2
    err = one_line_error(capsys)
    assert err.startswith("keras-local-train: error: cannot write") and save_dir in err, err
    assert loads == []  # refused before the data are read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_recorded_epoch_counts_nested_too_deep_are_refused_not_recursed(tmp_path):
    """The epoch count inside a checkpoint and the backup's metadata are untrusted JSON: a
    file nested thousands of levels deep is a ValueError (one line), not a RecursionError."""
    import zipfile

    from keras_local.run import resume

    checkpoint = tmp_path / "last.keras"
    with zipfile.ZipFile(checkpoint, "w") as archive:
        archive.writestr(resume.CHECKPOINT_STATE, "[" * 4000 + "]" * 4000)
    with pytest.raises(ValueError, match="no epoch count recorded"):
        resume.checkpoint_epochs(checkpoint)
    (tmp_path / "backup").mkdir()
    (tmp_path / resume.BACKUP_METADATA).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested deeper"):
        resume._load_backup(str(tmp_path), model=None)
