import gzip
import pathlib
import pickle

import numpy as np
import pytest

import keras_local as kl
from keras_local import data
from keras_local.data import pipeline
from keras_local.data.idx import DataFileError, read_idx, write_idx


def test_demo_dataset_is_first_10000_fashion_mnist_training_images(fashion_mnist_dir):
    (x_train, y_train), (x_test, y_test) = data.load_arrays(kl.Config(dataset="fashion_mnist_demo"))
    assert x_train.shape == (8000, 28, 28, 1) and x_test.shape == (2000, 28, 28, 1)
    official = read_idx(f"{fashion_mnist_dir}/train-images-idx3-ubyte.gz", limit=10000)
    labels = read_idx(f"{fashion_mnist_dir}/train-labels-idx1-ubyte.gz", limit=10000)
    np.testing.assert_array_equal(np.concatenate([x_train, x_test])[..., 0], official)
    np.testing.assert_array_equal(np.concatenate([y_train, y_test]), labels)


def test_offline_idx_reader_and_max_train_examples(fashion_mnist_idx_dir, fashion_mnist_demo):
    config = kl.Config(dataset="fashion_mnist", data_dir=fashion_mnist_idx_dir,
                       max_train_examples=500)
    (x_train, y_train), (x_test, y_test) = data.load_arrays(config)
    assert x_train.shape == (500, 28, 28, 1) and x_train.dtype == np.uint8
    assert x_test.shape == (2000, 28, 28, 1) and y_test.dtype == np.int32
    np.testing.assert_array_equal(x_test, fashion_mnist_demo[1][0])
    np.testing.assert_array_equal(y_train, fashion_mnist_demo[0][1][:500])


def test_idx_round_trip_and_truncation(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / "a-idx3-ubyte.gz")
    write_idx(path, array)
    np.testing.assert_array_equal(read_idx(path), array)
    raw = gzip.decompress(pathlib.Path(path).read_bytes())
    with gzip.open(path, "wb") as stream:
        stream.write(raw[:-5])
    with pytest.raises(DataFileError, match="truncated"):
        read_idx(path)
    with open(path, "wb") as stream:
        stream.write(b"not gzip at all")
    with pytest.raises(DataFileError, match="cannot read"):
        read_idx(path)


def write_cifar_batch(path, images, labels):
    payload = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
               b"labels": list(labels)}
    with open(path, "wb") as stream:
        pickle.dump(payload, stream)


def test_cifar10_pickles_are_read(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=4)
        write_cifar_batch(folder / name, images, labels)
        batches.append((images, labels))
    (x_train, y_train), (x_test, y_test) = data.load_arrays(
        kl.Config(dataset="cifar10", data_dir=str(tmp_path)))
    np.testing.assert_array_equal(x_train[:4], batches[0][0])
    np.testing.assert_array_equal(y_test, batches[-1][1])
    assert x_train.shape == (20, 32, 32, 3)


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_hostile_cifar_pickle_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as stream:
            pickle.dump({b"data": Exploit(), b"labels": [0]}, stream)
    with pytest.raises(DataFileError, match="not a CIFAR batch file.*forbidden global"):
        data.load_arrays(kl.Config(dataset="cifar10", data_dir=str(tmp_path)))


def test_class_limited_order_respects_classes_per_batch(rng):
    labels = rng.integers(0, 10, size=1000)
    order = data.class_limited_order(labels, classes_per_batch=2, batch_size=32, rng=rng)
    assert set(order) == set(range(1000))  # every example at least once per epoch
    assert len(order) % 32 == 0
    for start in range(0, len(order), 32):
        assert len(set(labels[order[start:start + 32]])) <= 2


def test_pipeline_normalises_augments_and_is_deterministic():
    config = kl.Config(dataset="fashion_mnist_demo", batch_size=64, cutout=True, length=8)
    train, test = data.load_arrays(config)
    first = next(iter(data.make_datasets(config, train, test)[0]))
    again = next(iter(data.make_datasets(config, train, test)[0]))
    np.testing.assert_array_equal(first[0].numpy(), again[0].numpy())
    x_test, y_test = next(iter(data.make_datasets(config, train, test)[1]))
    expected = (test[0][: len(x_test)] / 255.0 - 0.286) / 0.353
    np.testing.assert_allclose(x_test.numpy(), expected, atol=1e-5)
    # cutout zeroes a square after normalisation: exact zeros appear in training images
    assert (first[0].numpy() == 0.0).sum() >= 64 * 16


def test_pipeline_run_forever_feeds_each_epoch_as_the_one_epoch_pipeline_does():
    """make_datasets(first_epoch=E): epochs E, E+1, ... back to back, each batch equal to
    the one-epoch pipeline's for that epoch (order and augmentation), the partial last
    batch of each epoch kept; class-limited configs are refused."""
    config = kl.Config(dataset="fashion_mnist_demo", batch_size=64, max_train_examples=200)
    train, test = data.load_arrays(config)
    steps = pipeline.steps_per_epoch(config, len(train[1]))
    assert steps == 4  # 64 + 64 + 64 + 8
    forever = iter(data.make_datasets(config, train, test, first_epoch=2)[0])
    for epoch in (2, 3):
        clock = pipeline.EpochClock()
        clock.epoch = epoch
        one_epoch = list(data.make_datasets(config, train, test, epoch_clock=clock)[0])
        assert len(one_epoch) == steps and len(one_epoch[-1][1]) == 8
        for expected in one_epoch:
            images, labels = next(forever)
            np.testing.assert_array_equal(images.numpy(), expected[0].numpy())
            np.testing.assert_array_equal(labels.numpy(), expected[1].numpy())
    with pytest.raises(ValueError, match="first_epoch: not for class-limited"):
        data.make_datasets(config.replace(classes_per_batch=2), train, test, first_epoch=0)


def test_cutout_square_is_clipped_at_borders():
    import tensorflow as tf

    holes = (data.cutout(tf.ones((40, 8, 8, 1)), 4, tf.constant([3, 0], tf.int64)).numpy() == 0)
    per_image = holes.reshape(40, -1).sum(axis=1)
    assert per_image.max() == 16 and per_image.min() >= 4
    for hole in holes[..., 0]:  # one axis-aligned rectangle per image
        rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
        assert hole.sum() == len(rows) * len(cols)
        assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)


@pytest.mark.parametrize("dataset", ["fashion_mnist_demo", "cifar10"])
def test_batch_augmentation_crops_and_flips_each_image_on_its_own(dataset):
    """Every image of the batch is a window of its zero-padded self (mirrored where the
    dataset flips), with offsets drawn per image, not one for the whole batch."""
    import tensorflow as tf

    config = kl.Config(dataset=dataset)
    info = data.dataset_info(config)
    height, width, channels = info.input_shape
    rng = np.random.default_rng(0)
    images = rng.uniform(1, 2, size=(32, height, width, channels)).astype("float32")
    out = data.augment_batch(tf.constant(images), tf.constant([1, 7], tf.int64), info,
                             config).numpy()
    pad = info.crop_padding
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    found = []
    for i in range(len(images)):
        windows = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   for flip in ((False, True) if info.horizontal_flip else (False,))
                   if np.array_equal(out[i], (lambda w: w[:, ::-1] if flip else w)(
                       padded[i, dy:dy + height, dx:dx + width]))]
        assert windows, f"image {i} is no crop of its padded input"
        found.append(windows[0])
    assert len(set(found)) > 4  # drawn per image
    again = data.augment_batch(tf.constant(images), tf.constant([1, 7], tf.int64), info, config)
    np.testing.assert_array_equal(out, again.numpy())  # a function of the seed


def test_numpy_pipeline_matches_tf_data_normalisation_and_augments():
    """The pipeline used where TensorFlow is missing (JAX / torch machines)."""
    config = kl.Config(dataset="fashion_mnist_demo", batch_size=64, cutout=True, length=8)
    train, test = data.load_arrays(config)
    train_batches, test_batches = data.make_numpy_datasets(config, train, test)
    x_test, y_test = test_batches[0]
    np.testing.assert_allclose(x_test, (test[0][:256] / 255.0 - 0.286) / 0.353, atol=1e-5)
    np.testing.assert_array_equal(y_test, test[1][:256])
    x_train, y_train = train_batches[0]
    assert x_train.shape == (64, 28, 28, 1) and len(train_batches) == 125
    assert (x_train == 0.0).sum() >= 64 * 16  # cutout holes after normalisation
    again = data.make_numpy_datasets(config, train, test)[0][0][0]
    np.testing.assert_array_equal(x_train, again)  # deterministic under the seed
    train_batches.on_epoch_end()
    assert not np.array_equal(train_batches[0][1], y_train)  # reshuffled each epoch
