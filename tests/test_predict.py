"""keras-local-predict (and its repository shim python -m export.predict): classify PNG/JPEG
files and .npy batches with an exported ONNX model; bad input gives one line and exit code 2."""

import os
import pathlib
import shutil
import struct
import subprocess
import sys
import zlib

import keras
import numpy as np
import pytest
from PIL import Image

import keras_local as kl
from keras_local.data.catalogue import get_dataset_info
from keras_local.exporting import export_model

from export.predict import main as predict_main

from helpers import normalise_fashion_mnist as normalise

INFO = get_dataset_info("fashion_mnist")
REPO = pathlib.Path(__file__).resolve().parents[1]


def run_predict(*args, shim=False):
    """The installed console script keras-local-predict, or (``shim``) the repository's
    python -m export.predict."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    script = shutil.which("keras-local-predict", path=os.path.dirname(sys.executable))
    assert script, "console script keras-local-predict not installed: pip install -e . first"
    command = [sys.executable, "-m", "export.predict"] if shim else [script]
    return subprocess.run([*command, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def learned(fashion_mnist_demo, tmp_path_factory):
    """An mlp trained 1 epoch on 2,000 images, exported to ONNX, and a test image
    it classifies correctly with high confidence: (model.onnx, raw test images, Keras
    probabilities, index of that image)."""
    def load(split, limit):
        images, labels = split
        return images[:limit].astype("float32"), labels[:limit].astype("int32")

    (train_x, train_y), (test_x, test_y) = (load(split, limit) for split, limit
                                            in zip(fashion_mnist_demo, (2000, 200)))
    keras.utils.set_random_seed(1)
    config = kl.Config(dataset="fashion_mnist", model="mlp", num_layers=1, num_hidden=256,
                       lr=2e-3, jit_compile=False)
    model = kl.build_model("mlp", INFO.input_shape, INFO.num_classes, config)
    model.compile(run_eagerly=True)  # 16 steps run faster eagerly than traced
    model.fit(normalise(train_x), train_y, batch_size=128, epochs=1, verbose=0)
    probabilities = keras.ops.convert_to_numpy(
        keras.ops.softmax(model(normalise(test_x), training=False)))
    confident = np.flatnonzero((probabilities.argmax(-1) == test_y)
                               & (probabilities.max(-1) > 0.9))
    assert confident.size, "the briefly trained mlp classifies no test image confidently"
    out_dir = tmp_path_factory.mktemp("predict") / "fashion_mlp"
    export_model(model, out_dir, formats=("onnx",), check_images=test_x[:64])
    return out_dir / "model.onnx", test_x, probabilities, int(confident[0])


def parse_line(line):
    """'name: class p, class p, ...' -> (name, [(class, p), ...])."""
    name, _, ranked = line.rpartition(": ")
    pairs = [item.rsplit(" ", 1) for item in ranked.split(", ")]
    return name, [(label, float(p)) for label, p in pairs]


def test_predict_cli_classifies_a_png(learned, tmp_path):
    model_path, test_x, probabilities, index = learned
    png = tmp_path / "item.png"
    Image.fromarray(test_x[index, :, :, 0].astype("uint8")).save(png)
    result = run_predict(model_path, png)
    assert result.returncode == 0, result.stderr
    name, ranked = parse_line(result.stdout.strip())
    expected = int(probabilities[index].argmax())
    assert name == str(png) and len(ranked) == 3
    assert ranked[0][0] == INFO.class_names[expected]
    assert ranked[0][1] == pytest.approx(probabilities[index, expected], abs=1e-3)


def test_resized_rgb_jpeg_is_converted_to_the_model_input(learned, tmp_path, capsys):
    model_path, test_x, probabilities, index = learned
    jpeg = tmp_path / "big.jpg"
    gray = Image.fromarray(test_x[index, :, :, 0].astype("uint8"))
    gray.resize((84, 84), Image.Resampling.NEAREST).convert("RGB").save(jpeg, quality=95)
    assert predict_main([str(model_path), str(jpeg), "--top-k", "1"]) == 0
    _, ranked = parse_line(capsys.readouterr().out.strip())
    assert [label for label, _ in ranked] == [INFO.class_names[probabilities[index].argmax()]]


def test_npy_batches_match_keras(learned, tmp_path, capsys):
    model_path, test_x, probabilities, _ = learned
    np.save(tmp_path / "batch.npy", test_x[:5])
    np.save(tmp_path / "one.npy", test_x[5].astype("uint8"))
    assert predict_main([str(model_path), str(tmp_path / "batch.npy"),
                         str(tmp_path / "one.npy"), "--top-k", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [parse_line(line)[0] for line in lines] == \
        [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(5)] + [f"{tmp_path / 'one.npy'}[0]"]
    for line, expected in zip(lines, probabilities[:6]):
        ranked = dict(parse_line(line)[1])
        assert len(ranked) == 10
        for i, name in enumerate(INFO.class_names):
            assert ranked[name] == pytest.approx(expected[i], abs=1e-3)


def huge_png(path, size=100_000):
    """A valid PNG header claiming size x size pixels (a decompression bomb)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", size, size, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))
    return path


def bad_input(kind, tmp_path, model_path):
    """(model path, input path, text the error must contain) for one kind of bad input."""
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((28, 28, 1), "float32"))
    if kind == "undecodable image":
        path = tmp_path / "broken.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a PNG")
        return model_path, path, "cannot decode"
    if kind == "decompression bomb":
        return model_path, huge_png(tmp_path / "bomb.png"), "larger than"
    if kind == "wrong-shape array":
        path = tmp_path / "rgb.npy"
        np.save(path, np.zeros((2, 28, 28, 3), "float32"))
        return model_path, path, "(2, 28, 28, 3)"
    if kind == "pickled array":
        path = tmp_path / "objects.npy"
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return model_path, path, "objects.npy"
    if kind == "missing input":
        return model_path, tmp_path / "absent.png", "absent.png"
    if kind == "missing model":
        return tmp_path / "absent.onnx", good, "absent.onnx"
    if kind == "model without metadata":
        lone = tmp_path / "lone" / "model.onnx"
        lone.parent.mkdir()
        lone.write_bytes(model_path.read_bytes())
        return lone, good, "metadata.json"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["undecodable image", "decompression bomb",
                                  "wrong-shape array", "pickled array", "missing input",
                                  "missing model", "model without metadata"])
def test_bad_input_exits_2_with_one_line(kind, learned, tmp_path, capsys):
    model_path, source, message = bad_input(kind, tmp_path, learned[0])
    assert predict_main([str(model_path), str(source)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("keras-local-predict: error: ") and message in captured.err


def test_bad_input_from_the_command_line(learned, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a JPEG")
    result = run_predict(learned[0], broken)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "broken.jpg" in result.stderr
    assert result.stderr.startswith("keras-local-predict: error: ")
    assert run_predict(learned[0], broken, shim=True).stderr == result.stderr
