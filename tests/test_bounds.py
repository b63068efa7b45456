"""Bounds that hold: what a model file, a run's config.json or the command line asks for is
counted (every variable, heads included, plus gradients and optimiser slots) and refused
in one line before anything is built; JSON files are size- and depth-bounded."""

import json
import math
import zipfile

import keras
import pytest

import keras_local as kl
from keras_local.cli.export import main as export_main
from keras_local.cli.predict import main as predict_main
from keras_local.run.json_files import MAX_JSON_DEPTH, JSONFileError, read_json_file
from keras_local.run.model_files import (
    MAX_PARAMETERS,
    ModelFileError,
    check_keras_file,
    check_model_size,
    estimate_variables,
    memory_available,
)

from helpers import one_line_error, train_main

DEMO = ["--dataset", "fashion_mnist_demo"]


def size(variables):
    return sum(math.prod(v.shape) for v in variables)


# ------------------------------------------------------------------ the estimate
def test_estimate_by_hand_mlp_predsim_and_bio():
    # 2 x 32 units on 28x28x1, 10 classes. Per block: encoder (fan_in + 1) x 32, BatchNorm
    # 2 x 32 trainable + 2 x 32 moving statistics, pred head 33 x 10, sim head 32 x 32.
    config = kl.Config(model="mlp", num_layers=2, num_hidden=32)
    trainable = (785 * 32 + 64 + 330 + 1024) + (33 * 32 + 64 + 330 + 1024) + 33 * 10
    assert estimate_variables("mlp", (28, 28, 1), 10, config) == (trainable, 128)
    # bio, one block, target_proj_size 16: label projection 10 x 16 and feedback 32 x 16
    # (fixed), feedback-alignment kernel and bias 33 x 16 (trained), no sim head weights.
    config = kl.Config(model="mlp", num_layers=1, num_hidden=32, bio=True, target_proj_size=16)
    assert estimate_variables("mlp", (28, 28, 1), 10, config) == (
        785 * 32 + 64 + 33 * 16 + 330, 64 + 160 + 32 * 16)


@pytest.mark.parametrize("name, shape, options", [
    ("mlp", (28, 28, 1), dict(num_layers=2, num_hidden=32, loss_unsup="recon", alpha=0.5)),
    ("vgg8b", (28, 28, 1), dict(feat_mult=0.0625, num_hidden=16, dim_in_decoder=64)),
    ("vgg8b", (96, 96, 3), dict(feat_mult=0.0625, num_hidden=16, bio=True,
                                target_proj_size=8)),
    ("vgg8b", (28, 28, 1), dict(feat_mult=0.0625, num_hidden=16, modules=2)),
    ("vgg8b", (28, 28, 1), dict(feat_mult=0.0625, num_hidden=16, backprop=True)),
    ("resnet18", (32, 32, 3), dict(feat_mult=0.125)),
    ("resnet18", (32, 32, 3), dict(feat_mult=0.125, pre_act=True, bio=True,
                                   target_proj_size=8)),
    ("wresnet16-4a", (32, 32, 3), dict(feat_mult=0.25, dropout=0.1)),
])
def test_estimate_equals_the_built_models_count(name, shape, options):
    """Every variable the model creates, heads, shortcuts, feedback and projection
    matrices included, is in the estimate: equal to count_params() of the built model."""
    config = kl.Config(model=name, dataset="fashion_mnist_demo", jit_compile=False, **options)
    trainable, non_trainable = estimate_variables(name, shape, 10, config)
    model = kl.build_model(name, shape, 10, config)
    assert (trainable, non_trainable) == (size(model.trainable_weights),
                                          size(model.non_trainable_weights))
    assert trainable + non_trainable == model.count_params()
    if not config.backprop:  # heads counted
        assert model.count_params() > model.inference_model().count_params()


@pytest.mark.parametrize("optim, momentum, slots", [
    ("adam", 0.0, 2), ("amsgrad", 0.0, 3), ("sgd", 0.9, 1), ("sgd", 0.0, 0)])
def test_optimizer_slots_are_the_optimizers(optim, momentum, slots):
    config = kl.Config(model="mlp", num_layers=1, num_hidden=16, optim=optim,
                       momentum=momentum, jit_compile=False)
    estimate = check_model_size("mlp", (28, 28, 1), 10, config)
    model = kl.build_model("mlp", (28, 28, 1), 10, config)
    model.compile()
    model.optimizer.build(model.trainable_variables)
    slot_variables = [v for v in model.optimizer.variables if len(v.shape)]  # no counters
    assert estimate.slots == slots
    assert size(slot_variables) == slots * estimate.trainable
    # 4 bytes per variable, gradient and slot
    assert estimate.bytes == 4 * (estimate.variables + (slots + 1) * estimate.trainable)


def test_refused_in_one_line_above_the_memory_available():
    config = kl.Config(model="mlp", num_layers=3, num_hidden=12000)
    with pytest.raises(ModelFileError) as refused:
        check_model_size("mlp", (28, 28, 1), 10, config, available_bytes=2**30)
    message = str(refused.value)
    assert "730,068,040 variables" in message and "10.88 GiB" in message
    assert "1.00 GiB of memory available" in message and "\n" not in message
    # Export (no optimiser): the variables alone, 730M x 4 bytes.
    with pytest.raises(ModelFileError, match="2.72 GiB, above the 1.00 GiB"):
        check_model_size("mlp", (28, 28, 1), 10, config, training=False,
                         available_bytes=2**30)
    available = memory_available()
    assert available is None or available > 0


# ------------------------------------------------------- residual networks (export, resume)
@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    config = kl.Config(model="resnet18", dataset="cifar10", feat_mult=0.125, jit_compile=False)
    model = kl.build_model("resnet18", (32, 32, 3), 10, config)
    path = tmp_path_factory.mktemp("resnet") / "resnet18.keras"
    model.save(path)
    return path, model.count_params()


def test_residual_network_files_are_checked_not_refused(resnet_file):
    """A resnet checkpoint passes the bound (it raised TypeError, so export refused every
    residual network and --resume crashed)."""
    path, count = resnet_file
    assert check_keras_file(path).variables == count
    config = kl.Config(model="resnet18", feat_mult=0.125)
    assert check_model_size("resnet18", (32, 32, 3), 10, config).variables == count


# -------------------------------------------------------------------- the command lines
def keras_file_with(path, source, **changes):
    """A copy of the .keras file ``source`` whose network config has ``changes``."""
    with zipfile.ZipFile(source) as archive_in, zipfile.ZipFile(path, "w") as archive_out:
        for item in archive_in.infolist():
            data = archive_in.read(item)
            if item.filename == "config.json":
                stored = json.loads(data)
                stored["config"]["config"].update(changes)
                data = json.dumps(stored)
            archive_out.writestr(item, data)
    return path


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    config = kl.Config(model="mlp", dataset="fashion_mnist_demo", num_layers=3, num_hidden=8,
                       jit_compile=False)
    model = kl.build_model("mlp", (28, 28, 1), 10, config)
    path = tmp_path_factory.mktemp("mlp") / "mlp.keras"
    model.save(path)
    return path


def mlp_variables(units, layers, projection=None):
    """Variables of an mlp on 28x28x1 with 10 classes, by hand: encoders, BatchNorm (4 per
    unit), per block a pred head ((units + 1) x 10) and a sim head (units x units), or in
    bio a label projection (10 x P), a feedback-alignment head ((units + 1) x P) and its
    feedback matrix (units x P); the output layer."""
    backbone = 785 * units + (layers - 1) * (units + 1) * units + 4 * units * layers
    if projection is None:
        heads = layers * ((units + 1) * 10 + units * units)
    else:
        heads = layers * (10 + (units + 1) + units) * projection
    return f"{backbone + heads + (units + 1) * 10:,} variables"


@pytest.mark.parametrize("changes, message", [
    (dict(num_hidden=30000), mlp_variables(30000, 3) + " (heads, feedback and projection "
     "matrices included), above the limit of 1,000,000,000"),
    (dict(num_hidden=16, bio=True, target_proj_size=100_000_000),
     mlp_variables(16, 3, 100_000_000)),
    (dict(num_hidden=-5), "num_hidden must be > 0, got -5"),
    (dict(num_layers="3"), "not a valid LocalModel config"),
])
def test_export_refuses_a_model_file_in_one_line(mlp_file, tmp_path, monkeypatch, capsys,
                                                 changes, message):
    path = keras_file_with(tmp_path / "changed.keras", mlp_file, **changes)

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(keras.saving, "load_model", never)
    assert export_main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_config_its_weights_cannot_hold(mlp_file, tmp_path, monkeypatch,
                                                         capsys):
    """3 x 12000 units fit the bound and this machine, but a config alone (weights of a
    3 x 8 model) used to be built, 5.5 GB, before its weights failed to load."""
    path = keras_file_with(tmp_path / "changed.keras", mlp_file, num_hidden=12000)
    monkeypatch.setattr(keras.saving, "load_model", lambda *args, **kwargs: 1 / 0)
    assert export_main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    with zipfile.ZipFile(mlp_file) as archive:
        held = archive.getinfo("model.weights.h5").file_size
    variables = mlp_variables(12000, 3).split()[0]
    assert (f"its config declares {variables} variables ({4 * int(variables.replace(',', '')):,}"
            f" bytes) but model.weights.h5 holds {held:,} bytes") in err


def run_dir_with(tmp_path, **values):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = kl.Config(dataset="fashion_mnist_demo", model="mlp", **values)
    (run_dir / "config.json").write_text(config.to_json())
    return run_dir


@pytest.mark.parametrize("values, message", [
    (dict(num_layers=3, num_hidden=30000), mlp_variables(30000, 3)),
    (dict(num_hidden=64, bio=True, target_proj_size=100_000_000),
     mlp_variables(64, 1, 100_000_000)),
])
def test_resume_refuses_a_config_above_the_bound(tmp_path, capsys, values, message):
    run_dir = run_dir_with(tmp_path, **values)
    before = sorted(p.name for p in run_dir.iterdir())
    assert train_main(["--resume", str(run_dir)]) == 2
    err = one_line_error(capsys)
    assert message in err and f"limit of {MAX_PARAMETERS:,}" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_resume_refuses_a_config_its_saved_states_cannot_hold(mlp_file, tmp_path, capsys):
    """config.json edited to 3 x 12000 units beside the checkpoint of a 3 x 8 model: within
    the bound, but it was built (8.4 GB, then an LLVM abort) before restoring failed."""
    run_dir = run_dir_with(tmp_path, num_layers=3, num_hidden=12000)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.keras").write_bytes(mlp_file.read_bytes())
    with zipfile.ZipFile(mlp_file) as archive:
        held = archive.getinfo("model.weights.h5").file_size
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert train_main(["--resume", str(run_dir)]) == 2
    err = one_line_error(capsys)
    assert (f"config.json declares {mlp_variables(12000, 3)} (2,920,272,160 bytes) but "
            f"checkpoints/last.keras holds {held:,} bytes of weights: was config.json "
            f"changed?") in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_fresh_run_with_huge_bio_projection_is_refused_before_anything(tmp_path, capsys):
    save_dir = tmp_path / "runs"
    assert train_main([*DEMO, "--model", "mlp", "--bio", "--target-proj-size", "100000000",
                       "--save-dir", str(save_dir)]) == 2
    assert mlp_variables(1024, 1, 100_000_000) in one_line_error(capsys)
    assert not save_dir.exists()


# ------------------------------------------------------------------------- JSON files
def nested(depth):
    return "[" * depth + "]" * depth


def test_json_files_are_size_and_depth_bounded(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(nested(MAX_JSON_DEPTH))
    assert read_json_file(path) == json.loads(nested(MAX_JSON_DEPTH))
    for text, message in [(nested(MAX_JSON_DEPTH + 1), "nested deeper than the limit of 32"),
                          (nested(100_000), "nested deeper"),
                          ('"' + "x" * (1 << 20) + '"', "larger than the limit of 1,048,576"),
                          ("{", "not valid JSON")]:
        path.write_text(text)
        with pytest.raises(JSONFileError, match=message):
            read_json_file(path)


@pytest.mark.parametrize("text", [nested(100_000), '{"a": "' + "x" * (2 << 20) + '"}'],
                         ids=["deep", "huge"])
def test_resume_with_a_deep_or_huge_config_json_is_one_line(tmp_path, capsys, text):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(text)
    assert train_main(["--resume", str(run_dir)]) == 2
    assert "config.json" in one_line_error(capsys)


def test_export_of_a_run_with_a_deep_config_json_is_one_line(mlp_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.keras").write_bytes(mlp_file.read_bytes())
    (run_dir / "config.json").write_text(nested(100_000))
    assert export_main([str(run_dir), "--out", str(tmp_path / "out")]) == 2
    assert "nested deeper" in one_line_error(capsys)


def test_predict_metadata_deep_or_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "model.onnx").write_bytes(b"not used")
    (tmp_path / "metadata.json").write_text(nested(100_000))
    image = tmp_path / "x.npy"
    image.write_bytes(b"")
    assert predict_main([str(tmp_path / "model.onnx"), str(image)]) == 2
    assert "nested deeper" in one_line_error(capsys)
    assert predict_main([str(tmp_path), str(image)]) == 2
    assert f"model file {tmp_path} is a directory" in one_line_error(capsys)


def test_predict_input_directory_is_one_line(tmp_path):
    from keras_local.cli.predict import BadInput, load_inputs

    with pytest.raises(BadInput, match=f"^input file {tmp_path} is a directory$"):
        load_inputs([tmp_path], (28, 28, 1))


@pytest.mark.parametrize("field, value", [("num_hidden", 64.5), ("num_layers", "3"),
                                          ("batch_size", True), ("target_proj_size", 1e8)])
def test_config_counts_are_whole_numbers(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be a whole number, got "):
        kl.Config(**{field: value})
