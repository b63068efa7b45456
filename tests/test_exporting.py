"""Export (keras_local/exporting.py, keras-local-export): heads stripped, SavedModel + ONNX
reproduce the trained Keras model on real Fashion-MNIST test images fed as raw pixels."""

import hashlib
import json
import zipfile

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf

import keras_local as kl
from keras_local import exporting
from keras_local.data.catalogue import get_dataset_info
from keras_local.exporting import ExportError, export_model

from export.__main__ import main as export_main

from helpers import normalise_fashion_mnist as normalise

INFO = get_dataset_info("fashion_mnist")
HEAD_WORDS = ("head", "projection", "feedback")
# A few steps with a large learning rate: logits of order 1-10 make parity meaningful.
MODELS = {
    # bio: feedback-alignment heads and a label projection, which must not be exported.
    "mlp": dict(num_layers=2, num_hidden=64, dropout=0.1, bio=True, lr=5e-3),
    "vgg8b": dict(num_layers=1, num_hidden=32, feat_mult=0.125, dim_in_decoder=512, beta=0.5,
                  lr=1e-2),
}


def raw_fashion_mnist(split, limit):
    """The first ``limit`` raw images of a split of the embedded demo, float32 NHWC."""
    images, labels = split
    return images[:limit].astype("float32"), labels[:limit].astype("int32")


def train(name, raw_images, labels, steps, batch_size=64, **options):
    keras.utils.set_random_seed(1)
    config = kl.Config(dataset="fashion_mnist", model=name, jit_compile=False, **options)
    model = kl.build_model(name, INFO.input_shape, INFO.num_classes, config)
    model.compile(run_eagerly=True)  # a few steps run faster eagerly than traced
    count = steps * batch_size
    model.fit(normalise(raw_images[:count]), labels[:count], batch_size=batch_size, epochs=1,
              verbose=0)
    return model


def keras_logits(model, raw):
    return keras.ops.convert_to_numpy(model(normalise(raw), training=False))


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory):
    """Hidden staging or backup directories an export may have left behind."""
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def fashion(fashion_mnist_demo):
    train, test = fashion_mnist_demo
    return raw_fashion_mnist(train, 512), raw_fashion_mnist(test, 500)


# The conv net's export (SavedModel + tf2onnx) takes over a minute on 2 cores: CI runs it
# with pytest -m slow; conv export parity stays in the default run through
# tests/test_resnet.py and tests/test_batch_norm.py.
@pytest.fixture(scope="module", params=["mlp", pytest.param("vgg8b", marks=pytest.mark.slow)])
def exported(request, fashion, tmp_path_factory):
    """(trained model, export dir, metadata) after a few training steps."""
    (train_x, train_y), (test_x, _) = fashion
    model = train(request.param, train_x, train_y, steps=8, **MODELS[request.param])
    out_dir = tmp_path_factory.mktemp(request.param) / "export"
    metadata = export_model(model, out_dir, check_images=test_x[:64], test_error=12.5)
    return model, out_dir, metadata


@pytest.fixture(scope="module")
def run_dir(fashion, tmp_path_factory):
    """A run directory as train.py writes it: config.json, model.keras, results.json."""
    (train_x, train_y), _ = fashion
    model = train("mlp", train_x, train_y, steps=2, num_layers=1, num_hidden=32)
    directory = tmp_path_factory.mktemp("runs") / "mlp_run"
    directory.mkdir()
    model.save(directory / "model.keras")
    (directory / "config.json").write_text(model.config.to_json())
    (directory / "results.json").write_text(json.dumps({"test_error": 21.5}))
    return directory


# ------------------------------------------------------------------ export contents
def test_export_writes_both_formats_and_self_describing_metadata(exported):
    model, out_dir, metadata = exported
    assert (out_dir / "model.onnx").is_file()
    assert (out_dir / "saved_model" / "saved_model.pb").is_file()
    assert json.loads((out_dir / "metadata.json").read_text()) == metadata
    assert metadata["input"]["shape"] == [None, 28, 28, 1]
    assert metadata["class_names"] == list(INFO.class_names)
    assert metadata["dataset"] == "fashion_mnist"
    assert metadata["config"] == model.config.to_dict()
    assert metadata["test_error"] == 12.5
    assert metadata["parameter_count"] == model.inference_model().count_params()
    written = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}
    assert set(metadata["files"]) == written - {"metadata.json"}
    for relative, digest in metadata["files"].items():
        assert sha256(out_dir / relative) == digest, relative
    assert leftovers(out_dir.parent) == []


def test_onnx_matches_keras_on_real_test_images(exported, fashion):
    model, out_dir, _ = exported
    _, (test_x, _) = fashion
    session = onnxruntime.InferenceSession(str(out_dir / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    assert onnx_input.shape[0] == "batch" and onnx_input.type == "tensor(float)"
    opset = {o.domain: o.version for o in onnx.load(out_dir / "model.onnx").opset_import}
    assert opset[""] >= 17
    expected = keras_logits(model, test_x)
    logits = session.run(["logits"], {"pixels": test_x})[0]
    single = session.run(["logits"], {"pixels": test_x[:1]})[0]  # dynamic batch
    diff = np.abs(logits - expected).max()
    print(f"\n{model.architecture} ONNX max abs logit diff on {len(test_x)} images: {diff:.3g}"
          f" (max abs logit {np.abs(expected).max():.3g})")
    assert diff < 1e-4
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))
    np.testing.assert_allclose(single, logits[:1], atol=1e-5)


def test_saved_model_matches_keras_on_real_test_images(exported, fashion):
    model, out_dir, _ = exported
    _, (test_x, _) = fashion
    serve = tf.saved_model.load(str(out_dir / "saved_model")).signatures["serving_default"]
    expected = keras_logits(model, test_x)
    logits = serve(pixels=tf.constant(test_x))["logits"].numpy()
    diff = np.abs(logits - expected).max()
    print(f"\n{model.architecture} SavedModel max abs logit diff on {len(test_x)} images: "
          f"{diff:.3g} (max abs logit {np.abs(expected).max():.3g})")
    assert diff < 1e-4
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


def test_saved_model_holds_exactly_the_backbone(exported):
    model, out_dir, _ = exported
    backbone = model.inference_model()
    variables = tf.saved_model.load(str(out_dir / "saved_model")).variables
    assert sum(int(np.prod(v.shape)) for v in variables) == backbone.count_params()
    assert model.count_params() > backbone.count_params()  # the trained model had heads
    names = [v.name for v in variables]
    assert not [n for n in names if any(word in n for word in HEAD_WORDS)]
    assert sorted(n.split(":")[0] for n in names) == sorted(w.path for w in backbone.weights)


def test_onnx_holds_the_backbone_without_heads(exported):
    model, out_dir, _ = exported
    backbone = model.inference_model()
    graph = onnx.load(out_dir / "model.onnx").graph
    weights = [init for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
    assert not [w.name for w in weights if any(word in w.name for word in HEAD_WORDS)]
    # tf2onnx folds each inference BatchNorm's four vectors (gamma, beta, moving mean,
    # moving variance) into two (scale, shift); the in-graph normalisation adds a scale
    # and an offset per input channel. Everything else is one initializer per weight.
    # (Grappler also drops an all-zero bias or shift: true of an untrained model, not here.)
    bn_channels = sum(int(layer.gamma.shape[0]) for layer in backbone.layers
                      if isinstance(layer, keras.layers.BatchNormalization))
    channels = INFO.input_shape[-1]
    expected = backbone.count_params() - 2 * bn_channels + 2 * channels
    assert sum(int(np.prod(w.dims)) for w in weights) == expected
    kernels = [layer for layer in backbone.layers
               if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len([n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]) == \
        len(kernels)


# ----------------------------------------------------------------- failure handling
def small_model(**options):
    config = kl.Config(dataset="fashion_mnist", model="mlp", num_layers=1, num_hidden=16,
                       backprop=True, **options)
    return kl.build_model("mlp", INFO.input_shape, INFO.num_classes, config)


def test_failed_parity_raises_and_leaves_nothing(tmp_path, monkeypatch):
    real = exporting._onnx_logits
    monkeypatch.setattr(exporting, "_onnx_logits", lambda path, images: real(path, images) + 1e-3)
    with pytest.raises(ExportError, match="ONNX logits differ"):
        export_model(small_model(), tmp_path / "export", formats=("onnx",))
    assert list(tmp_path.iterdir()) == []


def test_existing_export_is_kept_unless_overwrite(tmp_path):
    out_dir = tmp_path / "export"
    export_model(small_model(), out_dir, formats=("onnx",))
    with pytest.raises(FileExistsError, match="already exists"):
        export_model(small_model(), out_dir, formats=("onnx",))
    export_model(small_model(), out_dir, formats=("onnx",), overwrite=True)
    assert sorted(p.name for p in out_dir.iterdir()) == ["metadata.json", "model.onnx"]
    assert leftovers(tmp_path) == []
    other = tmp_path / "notes"  # overwrite replaces a previous export, nothing else
    other.mkdir()
    (other / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="not an export directory"):
        export_model(small_model(), other, formats=("onnx",), overwrite=True)
    assert (other / "old.txt").read_text() == "old"


def test_mixed_precision_model_exports_in_float32(tmp_path):
    model = small_model(precision="mixed_bfloat16")
    metadata = export_model(model, tmp_path / "export", formats=("onnx",))
    graph = onnx.load(tmp_path / "export" / "model.onnx").graph
    assert {init.data_type for init in graph.initializer} <= {onnx.TensorProto.FLOAT,
                                                              onnx.TensorProto.INT64}
    assert metadata["parameter_count"] == model.inference_model().count_params()


def test_export_needs_tensorflow_backend(tmp_path, monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="export needs TensorFlow"):
        export_model(small_model(), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("formats", [("tflite",), ()])
def test_unknown_format_is_refused(tmp_path, formats):
    with pytest.raises(ValueError, match="export format"):
        export_model(small_model(), tmp_path / "export", formats=formats)


# ----------------------------------------------------------------------------- CLI
def test_cli_exports_a_run_directory(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "mlp"
    assert export_main([str(run_dir), "--format", "onnx", "savedmodel", "--out",
                        str(out_dir)]) == 0
    metadata = json.loads((out_dir / "metadata.json").read_text())
    assert metadata["test_error"] == 21.5
    assert metadata["config"] == json.loads((run_dir / "config.json").read_text())
    assert (out_dir / "model.onnx").is_file() and (out_dir / "saved_model").is_dir()
    assert "heads stripped" in capsys.readouterr().out


def test_cli_default_out_and_last_checkpoint(run_dir, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text((run_dir / "config.json").read_text())
    (run / "checkpoints" / "last.keras").write_bytes((run_dir / "model.keras").read_bytes())
    monkeypatch.chdir(tmp_path)
    assert export_main([str(run), "--format", "onnx"]) == 0
    assert (tmp_path / "saved_models" / "resumed" / "model.onnx").is_file()
    assert export_main([str(run_dir / "model.keras"), "--format", "onnx"]) == 0
    metadata = json.loads((tmp_path / "saved_models" / "model" / "metadata.json").read_text())
    assert metadata["test_error"] is None and metadata["architecture"] == "mlp"


def make_bad_input(kind, tmp_path, run_dir):
    if kind == "missing path":
        return tmp_path / "no_such_run"
    if kind == "not a run directory":
        (tmp_path / "photos").mkdir()
        return tmp_path / "photos"
    if kind == "run without model":
        run = tmp_path / "empty_run"
        run.mkdir()
        (run / "config.json").write_text("{}")
        return run
    if kind == "corrupt checkpoint":
        path = tmp_path / "broken.keras"
        path.write_bytes(b"PK\x03\x04 this is not a zip archive")
        return path
    if kind == "zip without a model":
        path = tmp_path / "archive.keras"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
        return path
    if kind == "lambda layer (unsafe)":
        inputs = keras.Input((4,))
        path = tmp_path / "lambda.keras"
        keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(path)
        return path
    if kind == "not a LocalModel":
        inputs = keras.Input((4,))
        path = tmp_path / "plain.keras"
        keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(path)
        return path
    if kind == "bad results.json":
        run = tmp_path / "run"
        run.mkdir()
        for name in ("config.json", "model.keras"):
            (run / name).write_bytes((run_dir / name).read_bytes())
        (run / "results.json").write_text("{not json")
        return run
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing path", "not a run directory", "run without model",
                                  "corrupt checkpoint", "zip without a model",
                                  "lambda layer (unsafe)", "not a LocalModel",
                                  "bad results.json"])
def test_cli_bad_input_exits_2_and_writes_nothing(kind, run_dir, tmp_path, monkeypatch, capsys):
    source = make_bad_input(kind, tmp_path, run_dir)
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert export_main([str(source), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("keras-local-export: error: ") and source.name in captured.err
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_refuses_existing_out_dir(run_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert export_main([str(run_dir), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []

