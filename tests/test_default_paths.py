"""The default-path matrix: what a user reaches first, with every default left on.

Every registered model (``list_models()``) in every training mode, and every dataset kind
of the catalogue, goes through the whole life of a run from the command line: train.py
trains epoch 1 (similarity images, checkpoint, TensorBoard logs: all the defaults) and is
SIGKILLed in epoch 2; ``--resume`` finishes it and exports as train.py does by default
(SavedModel + ONNX, parity checked); ``python -m export`` exports the finished run again;
``python -m export.predict`` classifies an image with that export.

Only what cannot be the default changes: ``--epochs 2`` (the kill comes in epoch 2), tiny
generated data (the models' rows: Fashion-MNIST IDX files for the mlp, CIFAR-10 batches for
conv nets), and ``--feat-mult 0.0625`` for convolutional networks (full-width networks take
minutes per step on a CPU).

Four tiers, because with every row CI ran 97 minutes on two cores, past its 90: the cheapest
row runs in the default suite; one model of every builder and variant in every mode, and every
reader of the dataset kinds, are ``slow``; the remaining rows (deeper members of a family, the
same reader under another dataset name) are ``matrix``, except the deepest networks'
(resnet101, resnet152, wresnet40-10 and its "a" form: 3,900 s of rows, 13 minutes for one
resnet152 row), which are ``deep``. CI runs the slow and matrix rows with the rest
of the slow tier (``python -m pytest -q -m "slow or matrix" -n 2 --maxschedchunk 1``); the deep
ones run by hand (``-m deep -n 2 --maxschedchunk 1``). Rows are handed out one at a time, the
longest first (``HEAVIEST_FIRST``). A ``matrix`` or ``deep`` row predicts with the export
train.py wrote (SavedModel + ONNX, parity checked) and leaves out the second export by
``python -m export``: that command is the same code for every member of a family, and the
slow rows run it.
"""

import gzip
import json
import os
import pickle
import shlex
import struct

import numpy as np
import pytest
from PIL import Image

from keras_local.data.catalogue import list_datasets
from keras_local.data.loading import MNIST_FAMILY
from keras_local.models import list_models

from helpers import history_epochs, run_python

pytestmark = pytest.mark.tensorflow_only

SMALL_FEAT_MULT = "0.0625"
MODES = {"predsim": [], "backprop": ["--backprop"], "bio": ["--bio"]}
# The one row of the default suite: the cheapest.
FAST_MODELS = {("mlp", "predsim")}
FAST_DATASETS = set()
# Rows CI runs (slow): every builder and variant (CIFAR-style "a"/"b" VGG, ImageNet-style VGG,
# basic-block ResNet, the wide ResNets and their adapted "a" form) in predsim, and one
# model per family in every other mode. Every other row is ``matrix`` (module doc).
CI_MODELS = {("vgg6a", "predsim"), ("vgg8", "predsim"), ("vgg8b", "predsim"),
             ("resnet18", "predsim"), ("wresnet10-8a", "predsim"), ("wresnet16-4", "predsim"),
             ("mlp", "backprop"), ("vgg8b", "backprop"), ("resnet18", "backprop"),
             ("mlp", "bio"), ("vgg8b", "bio"), ("resnet18", "bio")}
# The rows outside CI (module doc): the builders of resnet50 and wresnet28-10, deeper.
DEEP_MODELS = {"resnet101", "resnet152", "wresnet40-10", "wresnet40-10a"}
# The longest rows, collected first: pytest-xdist (--maxschedchunk 1) hands rows out one at
# a time in collection order, so these start at once on both workers and short rows fill
# the end.
HEAVIEST_FIRST = ("resnet152", "resnet101", "wresnet40-10", "wresnet40-10a", "resnet50",
                  "wresnet28-10a", "wresnet28-10", "resnet34")
# One dataset per reader: the same IDX reader serves kmnist and fashion_mnist, the same
# pickle reader cifar100.
CI_DATASETS = {"fashion_mnist_demo", "mnist", "cifar10", "folder", "imagenet"}
# Datasets read only through tensorflow-datasets (no reader of their original files in
# keras-local): they need the network or TFDS's manual_dir archives, so no row here.
TFDS_ONLY = {"svhn", "stl10"}
# Image-folder rows: (dataset, --image-size or None for the dataset's default).
FOLDER_ROWS = [("folder", None), ("folder", 96), ("folder", 224), ("imagenet", None)]


# ------------------------------------------------------------------ tiny datasets
def demo_arrays(count):
    """The first ``count`` demo images (28 x 28 uint8) and labels, classes all present."""
    from keras_local.data.loading import _load_demo

    (images, labels), _ = _load_demo()
    return images[:count, ..., 0], labels[:count]


def write_idx(folder, train=64, test=32):
    """MNIST-family IDX files (gzip) of ``train`` + ``test`` demo images."""
    images, labels = demo_arrays(train + test)
    os.makedirs(folder, exist_ok=True)
    for split, part in (("train", slice(0, train)), ("t10k", slice(train, train + test))):
        pixels, classes = images[part], labels[part].astype(np.uint8)
        with gzip.open(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), "wb") as out:
            out.write(struct.pack(">IIII", 0x803, *pixels.shape) + pixels.tobytes())
        with gzip.open(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), "wb") as out:
            out.write(struct.pack(">II", 0x801, len(classes)) + classes.tobytes())
    return folder


def colour_images(count, size, classes, seed=0):
    """Noisy images whose mean colour depends on the class: (uint8 images, labels)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    base = rng.integers(30, 220, size=(classes, 3))
    images = np.clip(base[labels][:, None, None, :] + rng.normal(0, 20, (count, size, size, 3)),
                     0, 255).astype(np.uint8)
    return images, labels


def write_cifar(folder, name, train=64, test=32):
    """CIFAR python batches as the canonical archives hold them (dicts of bytes keys)."""
    classes, key = (10, b"labels") if name == "cifar10" else (100, b"fine_labels")
    images, labels = colour_images(train + test, 32, classes)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    parts = ({f"data_batch_{i}": slice((i - 1) * train // 5, i * train // 5)
              for i in range(1, 6)} | {"test_batch": slice(train, train + test)}
             if name == "cifar10" else
             {"train": slice(0, train), "test": slice(train, train + test)})
    os.makedirs(folder, exist_ok=True)
    for file, part in parts.items():
        with open(os.path.join(folder, file), "wb") as out:
            pickle.dump({b"data": rows[part], key: [int(v) for v in labels[part]]}, out)
    return folder


def write_folder(folder, classes, size, train_per_class=2, val_per_class=1):
    """train/ and val/ of ``classes`` class folders holding size x size PNGs."""
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        images, labels = colour_images(len(classes) * per_class, size, len(classes),
                                       seed=split == "val")
        for index, (image, label) in enumerate(zip(images, labels)):
            target = os.path.join(folder, split, classes[label])
            os.makedirs(target, exist_ok=True)
            Image.fromarray(image).save(os.path.join(target, f"{index}.png"))
    return folder


def dataset_args(name, root, image_size=None):
    """(train.py data flags, an image file for predict) for a tiny dataset ``name``."""
    image = os.path.join(root, "query.png")
    if name == "fashion_mnist_demo":
        Image.fromarray(demo_arrays(1)[0][0]).save(image)
        return ["--dataset", name], image
    if name in MNIST_FAMILY:
        Image.fromarray(demo_arrays(1)[0][0]).save(image)
        return ["--dataset", name, "--data-dir", write_idx(os.path.join(root, name))], image
    if name in ("cifar10", "cifar100"):
        Image.fromarray(colour_images(1, 32, 10)[0][0]).save(image)
        return ["--dataset", name, "--data-dir", write_cifar(os.path.join(root, name), name)], \
            image
    if name in ("folder", "imagenet"):
        classes = [f"c{i}" for i in range(1000 if name == "imagenet" else 3)]
        # ImageNet needs its 1000 class folders: one small image each keeps it tiny.
        side = 40 if name == "imagenet" else (image_size or 32) + 8
        folder = write_folder(os.path.join(root, name), classes, side,
                              train_per_class=1 if name == "imagenet" else 8)
        size = ["--image-size", str(image_size)] if image_size else []
        return ["--dataset", name, "--data-dir", folder, *size], \
            os.path.join(folder, "val", "c1", "1.png")
    raise AssertionError(f"no tiny data for dataset {name!r}: add it to dataset_args")


# ------------------------------------------------------------------ one run's whole life
def similarity_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.join(run_dir, "logs", "similarity"),
                                   size_guidance={"tensors": 0})
    accumulator.Reload()
    return accumulator.Tags()["tensors"]


def whole_life(tmp_path, args, image, capsys, export_again=True):
    """Kill in epoch 2, resume (which exports), export again by ``python -m export`` unless
    ``export_again`` is False, predict (module docstring); returns the run dir."""
    from export.__main__ import main as export_main
    from export.predict import main as predict_main

    save_dir = tmp_path / "runs"
    killed = run_python("tests/kill_mid_epoch.py", "2", "1", *args, "--epochs", "2",
                        "--save-dir", save_dir, timeout=1800)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL in epoch 2, batch 1
    (run_dir,) = [str(path) for path in save_dir.iterdir()]
    assert history_epochs(run_dir) == [0]
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "last.keras"))
    assert any(tag.startswith("similarity/") for tag in similarity_tags(run_dir))

    resumed = run_python("train.py", "--resume", run_dir, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert history_epochs(run_dir) == [0, 1]
    assert os.path.isfile(os.path.join(run_dir, "results.json"))
    with open(os.path.join(run_dir, "export", "metadata.json")) as stream:
        assert sorted(json.load(stream)["parity_max_abs_diff"]) == ["onnx", "savedmodel"]

    out = tmp_path / "exported" if export_again else os.path.join(run_dir, "export")
    if export_again:
        capsys.readouterr()
        assert export_main([run_dir, "--out", str(out)]) == 0, capsys.readouterr().err
    with open(os.path.join(out, "metadata.json")) as stream:
        metadata = json.load(stream)
    assert sorted(metadata["parity_max_abs_diff"]) == ["onnx", "savedmodel"]
    capsys.readouterr()
    assert predict_main([os.path.join(out, "model.onnx"), image]) == 0, capsys.readouterr().err
    line = capsys.readouterr().out.strip()
    best = line.split(": ", 1)[1].split(", ")[0].rsplit(" ", 1)[0]  # "Ankle boot 0.104, ..."
    assert line.startswith(f"{image}: ") and best in metadata["class_names"], line
    return run_dir


# ------------------------------------------------------------------ the matrix
def model_rows():
    rows = []
    names = sorted(list_models(), key=lambda name: (
        HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST)))
    for name in names:
        for mode in MODES:
            marks = ([] if (name, mode) in FAST_MODELS else [pytest.mark.slow]
                     if (name, mode) in CI_MODELS else [pytest.mark.deep]
                     if name in DEEP_MODELS else [pytest.mark.matrix])
            rows.append(pytest.param(name, mode, marks=marks, id=f"{name}-{mode}"))
    return rows


def dataset_rows():
    rows = []
    for name in list_datasets():
        if name in TFDS_ONLY:
            continue
        sizes = [size for dataset, size in FOLDER_ROWS if dataset == name] or [None]
        for size in sizes:
            marks = ([] if name in FAST_DATASETS else [pytest.mark.slow]
                     if name in CI_DATASETS else [pytest.mark.matrix])
            rows.append(pytest.param(name, size, marks=marks,
                                     id=name + (f"-{size}px" if size else "")))
    return rows


def test_the_matrix_covers_every_registered_model_and_dataset():
    """A newly registered model or dataset gets its rows, or a decision here."""
    models = {param.values[0] for param in model_rows()}
    assert models == set(list_models())
    datasets = {param.values[0] for param in dataset_rows()}
    assert datasets | TFDS_ONLY == set(list_datasets())
    assert TFDS_ONLY.isdisjoint(MNIST_FAMILY + ("cifar10", "cifar100", "folder", "imagenet"))
    # folder at its default size (32), above the small-image limit (96) and at 224
    assert [param.id for param in dataset_rows() if param.values[0] == "folder"] == [
        "folder", "folder-96px", "folder-224px"]


def test_ci_runs_every_row_of_the_matrix():
    """The slow and matrix rows run in CI (.ci/run), not only by hand."""
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), ".ci", "run")) as stream:
        commands = [shlex.split(line)[3:] for line in stream
                    if line.startswith("python -m pytest")]
    # A command selecting both marks, over the whole suite or this file.
    matrix = [command for command in commands if "-m" in command
              and command[command.index("-m") + 1] == "slow or matrix"
              and {arg for arg in command if arg.startswith("tests")}
              <= {"tests", "tests/test_default_paths.py"}]
    assert matrix, commands
    # Handed out one at a time: in chunks of 23, one worker got all of HEAVIEST_FIRST's rows.
    assert matrix[0][matrix[0].index("--maxschedchunk") + 1] == "1", matrix


@pytest.mark.parametrize("model,mode", model_rows())
def test_every_model_and_mode_with_the_defaults(tmp_path, capsys, model, mode):
    # Conv nets on CIFAR-10: the ImageNet-style VGGs (five poolings) need 32 pixels, and
    # refuse 28 in one line ("Computed output size would be zero or negative").
    data, image = dataset_args("fashion_mnist" if model == "mlp" else "cifar10", str(tmp_path))
    width = [] if model == "mlp" else ["--feat-mult", SMALL_FEAT_MULT]
    whole_life(tmp_path, [*data, "--model", model, *width, *MODES[mode]], image, capsys,
               export_again=(model, mode) in FAST_MODELS | CI_MODELS)


@pytest.mark.parametrize("dataset,image_size", dataset_rows())
def test_every_dataset_kind_with_the_defaults(tmp_path, capsys, dataset, image_size):
    data, image = dataset_args(dataset, str(tmp_path), image_size)
    # The default model (vgg8b), narrow; at most 64 training images per epoch.
    whole_life(tmp_path, [*data, "--feat-mult", SMALL_FEAT_MULT, "--max-train-examples", "64"],
               image, capsys, export_again=dataset in FAST_DATASETS | CI_DATASETS)


# ------------------------------------------------------------------ failures before training
def test_similarity_images_of_a_large_image_folder_are_decoded(tmp_path):
    """Folders above 64 pixels hold file paths, not pixels, until the pipeline reads them."""
    import keras

    import keras_local as kl
    from keras_local.data.folders import describe_folder
    from keras_local.data.loading import load_arrays
    from keras_local.run.training import similarity_sample

    folder = write_folder(str(tmp_path / "images"), ["a", "b", "c"], 100, val_per_class=2)
    config = describe_folder(kl.Config(dataset="folder", data_dir=folder, image_size=96,
                                       backend=keras.backend.backend()))
    _, test = load_arrays(config)
    assert test[0].dtype.kind in "US"  # paths
    images, labels = similarity_sample(config, test)
    assert images.shape == (6, 96, 96, 3) and images.dtype == np.float32
    assert list(labels) == [0, 0, 1, 1, 2, 2]
    assert abs(float(images.mean())) < 3  # normalised with the folder's mean / std


def test_an_undecodable_similarity_image_is_one_line_and_leaves_no_run_dir(tmp_path, capsys):
    from keras_local.cli.train import main as train_main

    folder = write_folder(str(tmp_path / "images"), ["a", "b"], 100)
    broken = os.path.join(folder, "val", "a", "0.png")
    with open(broken, "r+b") as stream:  # a PNG signature, then garbage
        stream.seek(16)
        stream.write(b"\xff" * 64)
        stream.truncate(120)
    save_dir = tmp_path / "runs"
    assert train_main(["--dataset", "folder", "--data-dir", folder, "--image-size", "96",
                       "--save-dir", str(save_dir), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and broken in err and "cannot decode" in err, err
    assert not save_dir.exists() or not any(save_dir.iterdir())
