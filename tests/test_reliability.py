"""Reliability promises (README "Reliability"): nothing lost, nothing blown up.

One test per break of issue 15: outputs never replace their inputs, readers bound what
a file may make them allocate before allocating, exported files are verified before use,
resume decides from what is on disk and is exact, bad input is one line and exit 2."""

import csv
import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_local  # noqa: F401  (registers LocalModel for load_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
TINY = ["--dataset", "fashion_mnist_demo", "--model", "mlp", "--num-layers", "1",
        "--num-hidden", "32", "--max-train-examples", "512", "--batch-size", "64",
        "--dropout", "0.2", "--cutout", "--length", "8", "--seed", "3",
        "--lr-decay-milestones", "2", "--no-export", "--quiet", "--deterministic"]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def only_run_dir(save_dir):
    runs = glob.glob(os.path.join(save_dir, "*"))
    assert len(runs) == 1, runs
    return runs[0]


def weights(run_dir, name="model.keras"):
    model = keras.models.load_model(os.path.join(run_dir, name))
    return model, [keras.ops.convert_to_numpy(v) for v in model.weights]


def history_epochs(run_dir):
    return [int(row["epoch"]) for row in
            csv.DictReader(open(os.path.join(run_dir, "history.csv")))]


# ------------------------------------------------------------------ resume (breaks 4, 7)
def test_sigkill_mid_epoch_2_then_resume_gives_the_uninterrupted_weights(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    result = run("train.py", *TINY, "--epochs", "3", "--save-dir", straight)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run("tests/kill_mid_epoch.py", "2", "4", *TINY, "--epochs", "3",
                 "--save-dir", killed)
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL
    run_dir = only_run_dir(killed)
    assert not os.path.exists(os.path.join(run_dir, "results.json"))
    assert history_epochs(run_dir) == [0]
    result = run("train.py", "--resume", run_dir, "--quiet", "--no-export")
    assert result.returncode == 0, result.stderr[-2000:]
    assert history_epochs(run_dir) == [0, 1, 2]

    reference, expected = weights(only_run_dir(straight))
    resumed, actual = weights(run_dir)
    assert int(resumed.optimizer.iterations) == int(reference.optimizer.iterations) == 24
    for a, b, variable in zip(actual, expected, reference.weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=variable.path)


def test_resume_after_the_last_epoch_or_with_a_broken_backup_does_not_retrain(tmp_path):
    """Killed after the last epoch but before results.json, with a truncated backup:
    resume falls back to checkpoints/last.keras (notice), trains nothing, duplicates no
    history row; resuming a finished run is 'nothing to do', exit 0."""
    save_dir = str(tmp_path / "runs")
    result = run("train.py", *TINY, "--epochs", "2", "--save-dir", save_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = only_run_dir(save_dir)
    _, finished = weights(run_dir)
    for name in ("results.json", "model.keras"):  # as if killed right after fit()
        os.remove(os.path.join(run_dir, name))
    os.makedirs(os.path.join(run_dir, "backup"))
    with open(os.path.join(run_dir, "backup", "latest.weights.h5"), "wb") as stream:
        stream.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)  # truncated HDF5
    with open(os.path.join(run_dir, "backup", "training_metadata.json"), "w") as stream:
        json.dump({"epoch": 1, "batch": 0}, stream)

    result = run("train.py", "--resume", run_dir, "--quiet", "--no-export")
    assert result.returncode == 0, result.stderr[-2000:]
    notice = [line for line in result.stdout.splitlines() if line.startswith("resume: ")]
    assert len(notice) == 1 and "backup/ unreadable" in notice[0], result.stdout
    assert "checkpoints/last.keras after epoch 2" in notice[0]
    assert history_epochs(run_dir) == [0, 1]
    model, resumed = weights(run_dir)
    assert int(model.optimizer.iterations) == 16
    for a, b in zip(resumed, finished):
        np.testing.assert_array_equal(a, b)

    sys.path.insert(0, ROOT)
    try:
        from train import main as train_main
    finally:
        sys.path.remove(ROOT)
    assert train_main(["--resume", run_dir]) == 0


def test_resume_without_backup_or_checkpoint_starts_over_and_cuts_history(tmp_path):
    from keras_local.resume import restore

    model = keras_local.build_model("mlp", (4,), 3, keras_local.Config(num_hidden=8))
    model.compile()
    (tmp_path / "history.csv").write_text("epoch,loss\r\n0,1.0\r\n1,0.5\r\n")
    point = restore(str(tmp_path), model, epochs=3)
    assert (point.epochs_completed, point.source) == (0, "start")
    assert point.notice == ("no backup/, no checkpoints/last.keras; starting again from "
                            "epoch 1")
    assert (tmp_path / "history.csv").read_bytes() == b"epoch,loss\r\n"


# --------------------------------------------------------------- run directories (break 8)
def test_run_directories_are_created_atomically(tmp_path, monkeypatch):
    from keras_local import training

    config = keras_local.Config(save_dir=str(tmp_path / "runs"))
    monkeypatch.setattr(training, "new_run_dir",  # two runs started in the same second
                        lambda config, shared=False: os.path.join(config.save_dir, "run"))
    first = training.create_run_dir(config)
    second = training.create_run_dir(config)
    assert (first, second) == (str(tmp_path / "runs" / "run"), str(tmp_path / "runs" / "run-2"))
    assert os.path.isdir(first) and os.path.isdir(second)


# ------------------------------------------------------- one-line errors (breaks 5 and 6)
def train_main(argv):
    sys.path.insert(0, ROOT)
    try:
        from train import main
    finally:
        sys.path.remove(ROOT)
    return main(argv)


@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number, got nan"),
    (["--cutout", "--length", "-5"], "length must be > 0, got -5"),
    (["--classes-per-batch", "-1"], "classes_per_batch must be >= 0"),
    (["--batch-size", "1"], "batch_size must be >= 2"),
])
def test_bad_options_one_line_exit_2_no_run_dir(tmp_path, args, message, capsys):
    save_dir = tmp_path / "runs"
    code = train_main(["--dataset", "fashion_mnist_demo", "--model", "mlp", *args,
                       "--save-dir", str(save_dir), "--epochs", "1"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    assert not save_dir.exists()


def test_nan_message_names_only_files_that_exist(tmp_path):
    from keras_local.callbacks import NaNGuard, NonFiniteLossError

    guard = NaNGuard(str(tmp_path))
    with pytest.raises(NonFiniteLossError) as error:
        guard.on_train_batch_end(0, {"loss": float("nan")})
    assert "last.keras" not in str(error.value) and "no checkpoint" in str(error.value)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.keras").write_bytes(b"")
    with pytest.raises(NonFiniteLossError, match="last.keras, resumable with --resume"):
        guard.on_train_batch_end(0, {"loss": float("inf")})


# ------------------------------------------------------------------ IDX readers (break 2)
def idx_header(type_code, dims):
    return bytes([0, 0, type_code, len(dims)]) + np.asarray(dims, ">u4").tobytes()


class CountingReads:
    """Wraps an opener; counts the bytes read from the (decompressed) stream."""

    def __init__(self, opener):
        self.opener, self.total = opener, 0

    def __call__(self, *args, **kwargs):
        stream = self.opener(*args, **kwargs)
        real_read = stream.read

        def read(size=-1):
            data = real_read(size)
            self.total += len(data)
            return data

        stream.read = read
        return stream


@pytest.mark.parametrize("dims,compressed,message", [
    ([5_000_000, 28, 28], True, "more than a"),              # 4 KB gzip claims 3.9 GB
    ([2**32 - 1, 2**32 - 1, 2**32 - 1], True, "more than a"),  # overflows int64
    ([10**9, 28, 28], False, "but the file has"),            # raw file claims 784 GB
])
def test_idx_declared_sizes_are_checked_before_reading(tmp_path, monkeypatch, dims, compressed,
                                                       message):
    import gzip

    from keras_local.data import idx

    payload = idx_header(0x08, dims) + bytes(4096)
    path = tmp_path / ("images.gz" if compressed else "images")
    path.write_bytes(gzip.compress(payload) if compressed else payload)
    counter = CountingReads(gzip.open if compressed else open)
    if compressed:
        monkeypatch.setattr(idx, "gzip", type("G", (), {"open": counter,
                                                        "BadGzipFile": gzip.BadGzipFile}))
    else:
        monkeypatch.setattr(idx, "open", counter, raising=False)
    with pytest.raises(idx.DataFileError, match=message):
        idx.read_idx(path)
    assert counter.total == 4 + 4 * len(dims)  # only the header was read


def test_idx_absolute_bound_and_float_pixels(tmp_path):
    import gzip

    from keras_local.data.idx import DataFileError, read_idx

    path = tmp_path / "big.gz"
    path.write_bytes(gzip.compress(idx_header(0x08, [100, 28, 28]) + bytes(78400)))
    with pytest.raises(DataFileError, match="above the limit of 1,000"):
        read_idx(path, max_bytes=1000)
    floats = tmp_path / "train-images-idx3-ubyte"
    floats.write_bytes(idx_header(0x0D, [2, 28, 28]) + np.full((2, 28, 28), np.nan, ">f4")
                       .tobytes())
    with pytest.raises(DataFileError, match="elements are float32, expected uint8"):
        read_idx(floats, dtype=np.uint8)
    assert np.isnan(read_idx(floats)).all()  # the format itself stays readable


# ----------------------------------------------------------- model configs (break 2)
def test_keras_file_asking_for_a_huge_model_is_refused_before_building(tmp_path, monkeypatch,
                                                                       capsys):
    import zipfile

    import export.__main__ as export_cli

    config = keras_local.Config(dataset="fashion_mnist", model="mlp", num_layers=3,
                                num_hidden=16384).to_dict()
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({
            "module": "keras_local.models.local_model", "class_name": "LocalModel",
            "config": {"architecture": "mlp", "input_shape": [28, 28, 1], "num_classes": 10,
                       "config": config}}))
        archive.writestr("metadata.json", "{}")

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(export_cli.keras.models, "load_model", never)
    assert export_cli.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "549,928,970 parameters" in err and "limit" in err, err
    assert not (tmp_path / "out").exists()
