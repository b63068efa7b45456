"""Datasets as NumPy arrays (tfds, offline distribution files, the embedded demo) and
the tf.data training/test pipelines (normalisation, augmentation, sampling).

Arrays are raw uint8 pixels, NHWC, labels int32. Normalisation happens in the
pipeline (and inside the exported model), never in the stored arrays.
"""

import os
import pickle

import keras
import numpy as np

from keras_local.datasets import get_dataset_info
from keras_local.idx import DataFileError, read_idx

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
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFileError(
            f"{paths[0]}: expected N x 28 x 28 images matching {len(labels)} labels, "
            f"got shape {images.shape}")
    return images[..., None], labels.astype(np.int32)


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


def _read_cifar_batch(path, label_key):
    try:
        with open(path, "rb") as stream:
            batch = _CifarUnpickler(stream, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int32)
    except FileNotFoundError:
        raise DataFileError(f"{path}: missing CIFAR batch file") from None
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


# ------------------------------------------------------------------ sampling
def class_limited_order(labels, classes_per_batch, batch_size, rng):
    """An epoch's example order in which every consecutive ``batch_size`` examples hold
    at most ``classes_per_batch`` distinct classes (the reference's NClassRandomSampler).

    Each batch draws its classes at random among those with examples left and takes
    them round-robin from each class's shuffled queue. When the chosen classes run out
    before the batch is full, it is topped up with random repeats of those classes, so
    that every batch is full and batch boundaries stay aligned.
    """
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    queues = {c: list(rng.permutation(members)) for c, members in by_class.items()}
    order = []
    while queues:
        chosen = rng.choice(list(queues), size=min(classes_per_batch, len(queues)),
                            replace=False)
        batch = []
        while len(batch) < batch_size and any(queues.get(c) for c in chosen):
            for c in chosen:
                if queues.get(c) and len(batch) < batch_size:
                    batch.append(queues[c].pop())
        pool = np.concatenate([by_class[c] for c in chosen])
        batch.extend(rng.choice(pool, size=batch_size - len(batch)))
        order.extend(batch)
        queues = {c: queue for c, queue in queues.items() if queue}
    return np.asarray(order, dtype=np.int64)


# ------------------------------------------------------------------ pipeline
def normalise(images, info):
    """uint8 [0, 255] -> (x / 255 - mean) / std, float32."""
    import tensorflow as tf

    mean = tf.constant(info.mean, tf.float32)
    std = tf.constant(info.std, tf.float32)
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def make_datasets(config, train, test):
    """(train_ds, test_ds) tf.data pipelines of (normalised image, label) batches."""
    import tensorflow as tf

    info = get_dataset_info(config.dataset)
    x_train, y_train = train
    x_test, y_test = test
    autotune = tf.data.AUTOTUNE

    if config.classes_per_batch:
        epoch_counter = iter(range(1 << 62))

        def epoch_examples():
            rng = np.random.default_rng([config.seed, next(epoch_counter)])
            for index in class_limited_order(y_train, config.classes_per_batch,
                                             config.batch_size, rng):
                yield x_train[index], y_train[index]

        examples = tf.data.Dataset.from_generator(epoch_examples, output_signature=(
            tf.TensorSpec(x_train.shape[1:], tf.uint8), tf.TensorSpec((), tf.int32)))
    else:
        examples = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(
            len(x_train), seed=config.seed, reshuffle_each_iteration=True)

    seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True).batch(2)

    def augment(example, seed):
        image, label = example
        return augment_image(normalise(image, info), seed, info, config), label

    train_ds = (tf.data.Dataset.zip((examples, seeds))
                .map(augment, num_parallel_calls=autotune, deterministic=True)
                .batch(config.batch_size)
                .prefetch(autotune))
    test_ds = (tf.data.Dataset.from_tensor_slices((x_test, y_test))
               .batch(max(config.batch_size, 256))
               .map(lambda x, y: (normalise(x, info), y), num_parallel_calls=autotune)
               .prefetch(autotune))
    return train_ds, test_ds


def augment_image(image, seed, info, config):
    """Random crop after zero padding, horizontal flip, cutout (REFERENCE.md section 3).

    ``seed`` is a (2,) int64 tensor; every random choice is a stateless function of it.
    """
    import tensorflow as tf

    height, width, channels = info.input_shape
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    if info.crop_padding:
        pad = info.crop_padding
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(padded, (height, width, channels), seed=seeds[0])
    if info.horizontal_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
    if config.cutout:
        image = cutout(image, config.length, seeds[2])
    return image


def cutout(image, length, seed):
    """Zero one square of side ``length``, centre uniform over the image, clipped."""
    import tensorflow as tf

    height, width = image.shape[0], image.shape[1]
    uniform = tf.random.stateless_uniform((2,), seed=seed)
    centre = tf.cast(uniform * tf.constant([height, width], tf.float32), tf.int32)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    half = length // 2
    inside = ((rows >= centre[0] - half) & (rows < centre[0] - half + length)
              & (cols >= centre[1] - half) & (cols < centre[1] - half + length))
    return image * tf.cast(~inside, image.dtype)[:, :, None]


# ------------------------------------------------------- NumPy pipeline (no TensorFlow)
def tensorflow_available():
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def make_numpy_datasets(config, train, test):
    """(train, test) as ``keras.utils.PyDataset``s of NumPy batches: the same
    normalisation and augmentation as ``make_datasets``, for machines without
    TensorFlow (JAX or torch backends). Deterministic under ``config.seed``."""
    info = get_dataset_info(config.dataset)
    return (NumpyBatches(train, info, config, augment=True),
            NumpyBatches(test, info, config.replace(batch_size=max(config.batch_size, 256)),
                         augment=False))


class NumpyBatches(keras.utils.PyDataset):
    """Shuffled (or, for test, ordered) batches of normalised, augmented NumPy images."""

    def __init__(self, split, info, config, augment):
        super().__init__()
        self.images, self.labels = split
        self.info, self.config, self.augment = info, config, augment
        self.epoch = 0
        self.order = self._epoch_order()

    def _epoch_order(self):
        if not self.augment:
            return np.arange(len(self.images))
        rng = np.random.default_rng([self.config.seed, self.epoch])
        if self.config.classes_per_batch:
            return class_limited_order(self.labels, self.config.classes_per_batch,
                                       self.config.batch_size, rng)
        return rng.permutation(len(self.images))

    def __len__(self):
        return -(-len(self.order) // self.config.batch_size)

    def __getitem__(self, index):
        size = self.config.batch_size
        chosen = self.order[index * size:(index + 1) * size]
        images = normalise_numpy(self.images[chosen], self.info)
        if self.augment:
            rng = np.random.default_rng([self.config.seed, self.epoch, index])
            images = augment_numpy(images, rng, self.info, self.config)
        return images, self.labels[chosen]

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self._epoch_order()


def normalise_numpy(images, info):
    mean = np.asarray(info.mean, np.float32)
    std = np.asarray(info.std, np.float32)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def augment_numpy(images, rng, info, config):
    """Per-example random crop after zero padding, horizontal flip and cutout."""
    images = images.copy()
    batch, height, width, _ = images.shape
    if info.crop_padding:
        pad = info.crop_padding
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = rng.integers(0, 2 * pad + 1, size=(batch, 2))
        for i, (dy, dx) in enumerate(offsets):
            images[i] = padded[i, dy:dy + height, dx:dx + width]
    if info.horizontal_flip:
        flip = rng.random(batch) < 0.5
        images[flip] = images[flip, :, ::-1]
    if config.cutout:
        half = config.length // 2
        for i, (cy, cx) in enumerate(zip(rng.integers(0, height, batch),
                                         rng.integers(0, width, batch))):
            images[i, max(cy - half, 0):max(cy - half + config.length, 0),
                   max(cx - half, 0):max(cx - half + config.length, 0)] = 0.0
    return images
