"""Datasets as NumPy arrays: the embedded demo, offline distribution files (IDX, CIFAR
pickles) and tensorflow-datasets.

Arrays are raw uint8 pixels, NHWC, labels int32. Normalisation happens in the
pipeline (``keras_local.data.pipeline``) and inside the exported model, never in the
stored arrays.
"""

import io
import os
import pickle
import pickletools

import numpy as np

from keras_local.data.catalogue import get_dataset_info
from keras_local.data.folders import FOLDER_DATASETS
from keras_local.data.idx import DataFileError, read_idx

MNIST_FAMILY = ("mnist", "fashion_mnist", "kmnist")
DEMO_TRAIN_EXAMPLES = 8000
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetUnavailableError(RuntimeError):
    """The dataset cannot be loaded here (no files, no download possible)."""


def load_arrays(config):
    """((x_train, y_train), (x_test, y_test)) for ``config.dataset``.

    Sources, in order: the embedded demo; canonical files in ``config.data_dir``
    (MNIST-family IDX, CIFAR python pickles); tensorflow-datasets (``data_dir`` as
    its data dir). ``config.max_train_examples`` keeps the first N training images.
    """
    if config.dataset in FOLDER_DATASETS:
        return _load_folder(config)
    info = get_dataset_info(config.dataset)
    if config.dataset == "fashion_mnist_demo":
        train, test = _load_demo()
    elif config.data_dir and _offline_files_present(info.name, config.data_dir):
        train, test = _load_offline(info.name, config.data_dir)
    else:
        train, test = _load_tfds(info, config.data_dir)
    if config.max_train_examples is not None:
        train = (train[0][: config.max_train_examples], train[1][: config.max_train_examples])
    _check_arrays(info, train, "train")
    _check_arrays(info, test, "test")
    return train, test


# ------------------------------------------------------------------- sources
def _load_folder(config):
    """An image folder (keras_local.data.folders); max_train_examples keeps a seeded
    random subset (the files are ordered by class)."""
    from keras_local.data.folders import load_folder

    train, test = load_folder(config)
    if config.max_train_examples is not None and config.max_train_examples < len(train[1]):
        keep = np.sort(np.random.default_rng(config.seed).choice(
            len(train[1]), config.max_train_examples, replace=False))
        train = (train[0][keep], train[1][keep])
    return train, test


def _load_demo():
    from importlib import resources

    folder = resources.files("keras_local") / "data"
    with resources.as_file(folder / "fashion-mnist-demo-images-idx3-ubyte.gz") as path:
        images = read_idx(path)[..., None]
    with resources.as_file(folder / "fashion-mnist-demo-labels-idx1-ubyte.gz") as path:
        labels = read_idx(path).astype(np.int32)
    split = DEMO_TRAIN_EXAMPLES
    return (images[:split], labels[:split]), (images[split:], labels[split:])


def _find_file(data_dir, stem):
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def _cifar_dir(name, data_dir):
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    for candidate in (data_dir, os.path.join(data_dir, folder)):
        marker = "data_batch_1" if name == "cifar10" else "train"
        if os.path.isfile(os.path.join(candidate, marker)):
            return candidate
    return None


def _offline_files_present(name, data_dir):
    if name in MNIST_FAMILY:
        return any(_find_file(data_dir, stem) for pair in _IDX_FILES.values() for stem in pair)
    if name in ("cifar10", "cifar100"):
        return _cifar_dir(name, data_dir) is not None
    return False


def _load_offline(name, data_dir):
    if name in MNIST_FAMILY:
        return tuple(_load_idx_split(data_dir, split) for split in ("train", "test"))
    return _load_cifar(name, _cifar_dir(name, data_dir))


def _load_idx_split(data_dir, split):
    images_stem, labels_stem = _IDX_FILES[split]
    paths = [_find_file(data_dir, stem) for stem in (images_stem, labels_stem)]
    missing = [stem + ".gz" for stem, path in zip((images_stem, labels_stem), paths) if not path]
    if missing:
        raise DataFileError(f"--data-dir {data_dir} lacks {', '.join(missing)}")
    images = read_idx(paths[0], dtype=np.uint8)  # pixels are bytes: float files refused
    labels = read_idx(paths[1], dtype=np.uint8)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFileError(
            f"{paths[0]}: expected N x 28 x 28 images matching {len(labels)} labels, "
            f"got shape {images.shape}")
    return images[..., None], labels.astype(np.int32)


MAX_CIFAR_FILE_BYTES = 1 << 29  # CIFAR-100's train file, the largest, has 155 MB


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR batches contain (dicts of bytes, lists, NumPy arrays):
    a pickle that asks for any other class is not a CIFAR batch (and may be hostile)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _check_pickle_lengths(path, content):
    """Lengths declared inside a pickle are untrusted: the unpickler allocates what a
    bytes opcode declares before reading it. ``pickletools.genops`` reads the opcodes
    from the file's bytes and fails when a declared length runs past the end."""
    try:
        for _ in pickletools.genops(io.BytesIO(content)):
            pass
    except ValueError as error:
        raise DataFileError(f"{path}: not a CIFAR batch file (inconsistent pickle: "
                            f"{str(error)[:160]})") from None


def _read_cifar_batch(path, label_key):
    try:
        size = os.path.getsize(path)
        if size > MAX_CIFAR_FILE_BYTES:
            raise DataFileError(f"{path}: {size:,} bytes, larger than any CIFAR batch file "
                                f"(limit {MAX_CIFAR_FILE_BYTES:,})")
        with open(path, "rb") as stream:
            content = stream.read()
        _check_pickle_lengths(path, content)
        batch = _CifarUnpickler(io.BytesIO(content), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int32)
    except FileNotFoundError:
        raise DataFileError(f"{path}: missing CIFAR batch file") from None
    except DataFileError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, OSError,
            AttributeError, IndexError) as error:
        raise DataFileError(f"{path}: not a CIFAR batch file ({error})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataFileError(f"{path}: not a CIFAR batch file (data shape {data.shape})")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_cifar(name, folder):
    if name == "cifar10":
        parts = [_read_cifar_batch(os.path.join(folder, f"data_batch_{i}"), b"labels")
                 for i in range(1, 6)]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = _read_cifar_batch(os.path.join(folder, "test_batch"), b"labels")
    else:
        train = _read_cifar_batch(os.path.join(folder, "train"), b"fine_labels")
        test = _read_cifar_batch(os.path.join(folder, "test"), b"fine_labels")
    return train, test


def _load_tfds(info, data_dir):
    import tensorflow_datasets as tfds

    train_split = "train+extra" if info.name == "svhn" else "train"
    if data_dir and not os.path.isdir(data_dir):
        raise DataFileError(f"--data-dir {data_dir} does not exist")
    try:
        builder = tfds.builder(info.tfds_name, data_dir=data_dir)
        prepared = os.path.isdir(builder.data_dir) and os.listdir(builder.data_dir)
        if data_dir and not prepared:
            raise DataFileError(
                f"--data-dir {data_dir} holds neither the {info.name} distribution files "
                f"({_expected_files(info.name)}) nor a prepared tensorflow-datasets copy")
        if not prepared:
            _check_network(info)
            builder.download_and_prepare()
        arrays = [tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                   as_supervised=True))
                  for split in (train_split, "test")]
    except (DataFileError, DatasetUnavailableError):
        raise
    except Exception as error:  # tfds raises many kinds; all mean "not available here"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetUnavailableError(
            f"cannot load {info.name} with tensorflow-datasets ({reason[:200]}); "
            f"offline, pass --data-dir DIR with the original files ({_expected_files(info.name)}) "
            f"or try --dataset fashion_mnist_demo, which is embedded") from None
    return [(np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int32)) for x, y in arrays]


def _check_network(info):
    """Fail in one second, not after minutes of download retries, when offline."""
    import socket

    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
    except OSError:
        raise DatasetUnavailableError(
            f"cannot download {info.name}: no network; offline, pass --data-dir DIR with the "
            f"original files ({_expected_files(info.name)}) or try --dataset "
            f"fashion_mnist_demo, which is embedded") from None


def _expected_files(name):
    if name in MNIST_FAMILY:
        return "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-*.gz"
    if name == "cifar10":
        return "cifar-10-batches-py/data_batch_1..5, test_batch"
    if name == "cifar100":
        return "cifar-100-python/train, test"
    return "the archives tensorflow-datasets registers as downloads, via its manual_dir"


def _check_arrays(info, split, which):
    images, labels = split
    if images.shape[1:] != info.input_shape:
        raise DataFileError(f"{info.name} {which} images have shape {images.shape[1:]}, "
                            f"expected {info.input_shape}")
    if len(images) == 0:
        raise DataFileError(f"{info.name} {which} split is empty")
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise DataFileError(f"{info.name} {which} labels outside 0..{info.num_classes - 1}")
