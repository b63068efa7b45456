"""Reliability promises (docs/reliability.md): nothing lost, nothing blown up.

One test per break of issue 15: outputs never replace their inputs, readers bound what
a file may make them allocate before allocating, exported files are verified before use,
resume decides from what is on disk and is exact, bad input is one line and exit 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import keras_local as kl

from helpers import ENV, ROOT, history_epochs, only_run_dir, read_json, run_python, to_numpy, train_main

TINY = ["--dataset", "fashion_mnist_demo", "--model", "mlp", "--num-layers", "1",
        "--num-hidden", "32", "--max-train-examples", "512", "--batch-size", "64",
        "--dropout", "0.2", "--cutout", "--length", "8", "--seed", "3",
        "--lr-decay-milestones", "2", "--no-export", "--quiet", "--deterministic", "--no-jit"]


def weights(run_dir, name="model.keras"):
    model = kl.load_model(os.path.join(run_dir, name))
    return model, [to_numpy(v) for v in model.weights]


# ------------------------------------------------------------------ resume (breaks 4, 7)
@pytest.mark.slow  # three train.py runs: 1-3 minutes; CI runs it (pytest -m slow)
def test_sigkill_mid_epoch_2_then_resume_gives_the_uninterrupted_weights(tmp_path, capsys):
    """Exact resume; then the fallbacks of resume on the finished run (see below)."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    processes = [  # side by side: each spends most of its time importing TensorFlow
        subprocess.Popen([sys.executable, *args], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for args in (["train.py", *TINY, "--epochs", "3", "--save-dir", straight],
                     ["tests/kill_mid_epoch.py", "2", "4", *TINY, "--epochs", "3",
                      "--save-dir", killed])]
    errors = [process.communicate(timeout=300)[1] for process in processes]
    assert processes[0].returncode == 0, errors[0][-2000:]
    assert processes[1].returncode == -9, errors[1][-2000:]  # SIGKILL in epoch 2, batch 4
    run_dir = only_run_dir(killed)
    assert not os.path.exists(os.path.join(run_dir, "results.json"))
    assert history_epochs(run_dir) == [0]
    result = run_python("train.py", "--resume", run_dir, "--quiet", "--no-export")
    assert result.returncode == 0, result.stderr[-2000:]
    assert history_epochs(run_dir) == [0, 1, 2]

    reference, expected = weights(only_run_dir(straight))
    resumed, actual = weights(run_dir)
    assert int(resumed.optimizer.iterations) == int(reference.optimizer.iterations) == 24
    for a, b, variable in zip(actual, expected, reference.weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=variable.path)

    # The uninterrupted run, as if killed after fit() but before results.json, with a
    # truncated backup: resume falls back to checkpoints/last.keras (one-line notice),
    # trains nothing, duplicates no history row.
    run_dir = only_run_dir(straight)
    for name in ("results.json", "model.keras"):
        os.remove(os.path.join(run_dir, name))
    os.makedirs(os.path.join(run_dir, "backup"))
    with open(os.path.join(run_dir, "backup", "latest.weights.h5"), "wb") as stream:
        stream.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    with open(os.path.join(run_dir, "backup", "training_metadata.json"), "w") as stream:
        json.dump({"epoch": 1, "batch": 0}, stream)
    # No epoch is trained from here on: in this process, without global op determinism.
    config_path = os.path.join(run_dir, "config.json")
    config = read_json(config_path)
    with open(config_path, "w") as stream:
        json.dump({**config, "deterministic": False}, stream)
    capsys.readouterr()
    assert train_main(["--resume", run_dir, "--quiet", "--no-export"]) == 0
    out = capsys.readouterr().out
    notice = [line for line in out.splitlines() if line.startswith("resume: ")]
    assert len(notice) == 1 and "backup/ unreadable" in notice[0], out
    assert "checkpoints/last.keras after epoch 3" in notice[0]
    assert history_epochs(run_dir) == [0, 1, 2]
    model, again = weights(run_dir)
    assert int(model.optimizer.iterations) == 24
    for a, b in zip(again, expected):
        np.testing.assert_array_equal(a, b)
    # and once finished: nothing to do, exit 0
    assert train_main(["--resume", run_dir]) == 0
    finished = capsys.readouterr().out.strip()
    assert finished == f"keras-local-train: {run_dir} already finished, nothing to do"


# --------------------------------------------------------------- run directories (break 8)
def test_run_directories_are_created_atomically(tmp_path, monkeypatch):
    from keras_local.run import training

    config = kl.Config(save_dir=str(tmp_path / "runs"))
    monkeypatch.setattr(training, "new_run_dir",  # two runs started in the same second
                        lambda config, shared=False: os.path.join(config.save_dir, "run"))
    first = training.create_run_dir(config)
    second = training.create_run_dir(config)
    assert (first, second) == (str(tmp_path / "runs" / "run"), str(tmp_path / "runs" / "run-2"))
    assert os.path.isdir(first) and os.path.isdir(second)


# ------------------------------------------------------- one-line errors (breaks 5 and 6)


@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number, got nan"),
    (["--cutout", "--length", "-5"], "length must be > 0, got -5"),
    (["--classes-per-batch", "-1"], "classes_per_batch must be >= 0"),
    (["--batch-size", "1"], "batch_size must be >= 2"),
    (["--steps-per-execution", "-2"], "steps_per_execution must be >= 0 (0 = auto), got -2"),
])
def test_bad_options_one_line_exit_2_no_run_dir(tmp_path, args, message, capsys):
    save_dir = tmp_path / "runs"
    code = train_main(["--dataset", "fashion_mnist_demo", "--model", "mlp", *args,
                       "--save-dir", str(save_dir), "--epochs", "1"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    assert not save_dir.exists()


def test_nan_message_names_only_files_that_exist(tmp_path):
    from keras_local.run.callbacks import NaNGuard, NonFiniteLossError

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

    import keras_local.cli.export as export_cli

    config = kl.Config(dataset="fashion_mnist", model="mlp", num_layers=3,
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
    monkeypatch.setattr(export_cli.keras.saving, "load_model", never)
    assert export_cli.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    # heads included: three 16384 x 16384 sim heads are most of it
    assert err.count("\n") == 1 and "1,355,923,496 variables" in err and "limit" in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- export and predict (1, 3, 5, 8)
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run dir with config.json + model.keras, its ONNX export dir)."""
    from keras_local.exporting import export_model

    root = tmp_path_factory.mktemp("reliability")
    config = kl.Config(dataset="fashion_mnist", model="mlp", num_layers=1,
                                num_hidden=8, jit_compile=False)
    model = kl.build_model("mlp", (28, 28, 1), 10, config)
    model.compile()
    run_dir = root / "runs" / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    model.save(run_dir / "model.keras")
    model.save(run_dir / "checkpoints" / "last.keras")
    (run_dir / "config.json").write_text(config.to_json())
    export_model(model, root / "export", formats=("onnx",))
    return run_dir, root / "export"


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("out", ["run", "run/checkpoints", "runs"])
def test_export_never_replaces_its_inputs(exported, out, capsys):
    from export.__main__ import main as export_main

    run_dir = exported[0]
    before = tree(run_dir)
    target = {"run": run_dir, "run/checkpoints": run_dir / "checkpoints",
              "runs": run_dir.parent}[out]
    assert export_main([str(run_dir), "--format", "onnx", "--out", str(target),
                        "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("own input" in err or "not an export" in err), err
    assert tree(run_dir) == before


def test_export_into_an_unwritable_place_is_one_line_exit_2(exported, tmp_path, capsys):
    from export.__main__ import main as export_main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert export_main([str(exported[0]), "--format", "onnx", "--out",
                        str(blocker / "export")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("keras-local-export: error: cannot write the export"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_export_cleans_killed_staging_and_has_ordinary_permissions(exported, tmp_path):
    from export.__main__ import main as export_main

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".model.{dead}.abc.partial"  # left by an export killed earlier
    stale.mkdir()
    out_dir = tmp_path / "model"
    assert export_main([str(exported[0] / "model.keras"), "--format", "onnx",
                        "--out", str(out_dir)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    umask = os.umask(0)
    os.umask(umask)
    assert out_dir.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_overwrite_of_a_read_only_export_is_refused(exported, tmp_path, capsys):
    import shutil

    from export.__main__ import main as export_main

    out_dir = tmp_path / "export"
    shutil.copytree(exported[1], out_dir)
    out_dir.chmod(0o555)
    try:
        assert export_main([str(exported[0]), "--format", "onnx", "--out", str(out_dir),
                            "--overwrite"]) == 2
        assert "not writable" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    finally:
        out_dir.chmod(0o755)


def test_overwrite_checks_the_old_export_can_be_removed(exported, tmp_path, monkeypatch):
    """The same refusal as above, on machines where tests run as root: the destination
    is reported unwritable before anything is written."""
    import shutil

    from keras_local import exporting
    from keras_local.exporting import ExportError, check_replaceable

    out_dir = tmp_path / "export"
    shutil.copytree(exported[1], out_dir)
    monkeypatch.setattr(exporting.os, "access", lambda path, mode: pathlib_name(path) != "export")
    with pytest.raises(ExportError, match="is not writable"):
        check_replaceable(out_dir)


def pathlib_name(path):
    return os.path.basename(str(path))


def predict_main(argv):
    from export.predict import main

    return main([str(a) for a in argv])


def copy_export(exported, tmp_path):
    import shutil

    target = tmp_path / "export"
    shutil.copytree(exported[1], target)
    return target


def test_predict_verifies_the_model_sha256(exported, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    export_dir = copy_export(exported, tmp_path)
    model = onnx.load(export_dir / "model.onnx")
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = numpy_helper.to_array(weight).copy()
    values.reshape(-1)[:4] += 1.0  # 16 bytes of weights changed
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, export_dir / "model.onnx")
    pixels = tmp_path / "x.npy"
    np.save(pixels, np.full((1, 28, 28, 1), 128, "float32"))

    assert predict_main([export_dir / "model.onnx", pixels]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256" in err and "--no-verify" in err, err
    assert predict_main([export_dir / "model.onnx", pixels, "--no-verify"]) == 0
    assert capsys.readouterr().out.startswith(f"{pixels}[0]: ")


@pytest.mark.parametrize("damage,message", [
    ("shape", "disagrees with the model's"),
    ("pixels", "raw pixels must lie in [0, 255]"),
    ("unlisted", "lists no sha256"),
])
def test_predict_refuses_inconsistent_input(exported, tmp_path, capsys, damage, message):
    export_dir = copy_export(exported, tmp_path)
    metadata = json.loads((export_dir / "metadata.json").read_text())
    pixels = np.full((1, 28, 28, 1), 128, "float32")
    if damage == "shape":
        metadata["input"]["shape"] = [None, 32, 32, 1]
    elif damage == "pixels":
        pixels[0, 0, 0, 0] = 300.0
    else:
        del metadata["files"]["model.onnx"]
    (export_dir / "metadata.json").write_text(json.dumps(metadata))
    np.save(tmp_path / "x.npy", pixels)
    assert predict_main([export_dir / "model.onnx", tmp_path / "x.npy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cifar_pickle_declaring_more_bytes_than_it_holds_is_refused(tmp_path):
    """A 40-byte pickle whose bytes opcode declares 4 GiB: refused from the opcode
    stream, before the unpickler would allocate the declared size."""
    import tracemalloc

    from keras_local.data.idx import DataFileError
    from keras_local.data.loading import _read_cifar_batch

    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x04\x8e" + (1 << 32).to_bytes(8, "little") + b"x" * 29)
    tracemalloc.start()
    try:
        with pytest.raises(DataFileError, match="declared|expected 4294967296 bytes"):
            _read_cifar_batch(str(path), b"labels")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
