"""Training and test batches: tf.data pipelines (normalisation, augmentation, class-limited
sampling) and their NumPy twin for machines without TensorFlow."""

import keras
import numpy as np

from keras_local.data.catalogue import dataset_info, normalise


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


def classes_limited_in_epoch(config, epoch):
    """Whether 0-based ``epoch`` uses the class-limited order: with ``classes_per_batch``,
    every epoch, or with ``classes_per_batch_until_epoch`` N only epochs 0 .. N-1 (the
    reference's 1-based epochs 1 .. N); later epochs are shuffled as usual."""
    until = config.classes_per_batch_until_epoch
    return bool(config.classes_per_batch) and (until == 0 or epoch < until)


# ------------------------------------------------------------------ pipeline
class EpochClock:
    """The epoch a training pipeline is feeding: set by ``callbacks.RandomStreams`` at
    each epoch start (so a resumed run feeds epoch e as the uninterrupted run did); when
    nobody sets it, it counts the passes over the data."""

    def __init__(self):
        self.epoch = None
        self.passes = 0

    def current(self):
        if self.epoch is not None:
            return self.epoch
        self.passes += 1
        return self.passes - 1


def epoch_order(labels, config, epoch):
    """The example order of 0-based ``epoch``: a function of (config.seed, epoch) only."""
    rng = np.random.default_rng([config.seed, epoch])
    if classes_limited_in_epoch(config, epoch):
        return class_limited_order(labels, config.classes_per_batch, config.batch_size, rng)
    return rng.permutation(len(labels))


def make_datasets(config, train, test, epoch_clock=None, first_epoch=None):
    """(train_ds, test_ds) tf.data pipelines of (normalised image, label) batches.

    The order and the augmentation of training epoch e depend only on (seed, e, position
    in the epoch). Which epoch is fed:

    - ``first_epoch`` (an int; not with class-limited batches, whose epochs differ in
      length): train_ds runs epoch ``first_epoch``, then the next, forever; give ``fit``
      ``steps_per_epoch=steps_per_epoch(config, len(labels))``. Keras then keeps one
      iterator for the whole run, which prefetches across epoch ends: a new iterator
      per epoch had cost 0.1-30 s at some epoch starts (mlp on Fashion-MNIST, 2 cores).
    - otherwise train_ds is one epoch, the one ``epoch_clock`` names when its first
      batch is read (see EpochClock)."""
    import tensorflow as tf

    info = dataset_info(config)
    if first_epoch is not None and not feeds_epochs_forever(config, train):
        raise ValueError("first_epoch: not for class-limited epochs (classes_per_batch, "
                         "they differ in length) nor streamed image files; those are fed "
                         "one epoch at a time")
    if _streams_files(config, train):
        from keras_local.data.folders import make_folder_datasets

        return make_folder_datasets(config, info, train, test)
    x_train, y_train = train
    x_test, y_test = test
    autotune = tf.data.AUTOTUNE
    clock = epoch_clock if epoch_clock is not None else EpochClock()

    def order_of(epoch):
        return epoch_order(y_train, config, int(epoch)).astype(np.int64)

    def clock_epoch_and_order():
        epoch = clock.current()
        return np.int64(epoch), order_of(epoch)

    def epoch_and_order(epoch):
        # numpy_function, not Dataset.from_generator: once a process had iterated a
        # from_generator dataset, its XLA training steps ran 1.4-1.5x slower (mlp 3x1024
        # predsim, 105-113 against 67-78 ms per step on cached batches; TF 2.21, 2 cores).
        if epoch is None:
            epoch, order = tf.numpy_function(clock_epoch_and_order, [], (tf.int64, tf.int64),
                                             stateful=True)
        else:
            order = tf.numpy_function(order_of, [epoch], tf.int64, stateful=False)
        return tf.ensure_shape(epoch, ()), tf.ensure_shape(order, (None,))

    images, labels = tf.constant(x_train), tf.constant(y_train)
    batch_size = config.batch_size

    def epoch_batches(epoch, order):
        # Whole batches are gathered and augmented at once (augment_batch): a map per
        # example cost more CPU than the mlp's training step it fed.
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return batches.map(lambda index, chosen: (tf.gather(images, chosen),
                                                  tf.gather(labels, chosen),
                                                  batch_seed(config.seed, epoch, index)))

    if first_epoch is None:
        epochs = tf.data.Dataset.from_tensors(0).map(lambda _: epoch_and_order(None))
    else:
        epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).map(epoch_and_order)
    batches = epochs.flat_map(epoch_batches)

    def augment(images, labels, seed):
        return augment_batch(normalise(images, info), seed, info, config), labels

    train_ds = batches.map(augment, num_parallel_calls=autotune, deterministic=True)
    if first_epoch is None and not config.classes_per_batch:
        # a known length: Keras shows step N/N from epoch 1
        train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(
            steps_per_epoch(config, len(y_train))))
    train_ds = train_ds.prefetch(autotune)
    test_ds = (tf.data.Dataset.from_tensor_slices((x_test, y_test))
               .batch(max(config.batch_size, 256))
               .map(lambda x, y: (normalise(x, info), y), num_parallel_calls=autotune)
               .prefetch(autotune))
    return train_ds, test_ds


def feeds_epochs_forever(config, train):
    """Whether ``make_datasets(..., first_epoch=E)`` applies to this data: in-memory
    arrays and epochs of one length (no class-limited batches)."""
    return not config.classes_per_batch and not _streams_files(config, train)


def _streams_files(config, train):
    """Image folders given as file paths: make_folder_datasets streams them."""
    return config.dataset in ("folder", "imagenet") and train[0].dtype.kind in "US"


def steps_per_epoch(config, examples):
    """Batches in one epoch of ``examples`` training examples (the last may be partial)."""
    return -(-examples // config.batch_size)


def batch_seed(seed, epoch, index):
    """The (2,) int64 seed of batch ``index`` of 0-based ``epoch``: (seed, epoch * 2**32 + index)."""
    import tensorflow as tf

    index = tf.cast(index, tf.int64)
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64) * (1 << 32) + index])


def augment_batch(images, seed, info, config):
    """Random crop after zero padding, horizontal flip, cutout (docs/method.md section 9),
    drawn independently for every image of a (B, H, W, C) batch.

    ``seed`` is a (2,) int64 tensor; every random choice is a stateless function of it.
    """
    import tensorflow as tf

    height, width = info.input_shape[0], info.input_shape[1]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    batch = tf.shape(images)[0]
    if info.crop_padding:
        pad = info.crop_padding
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        offsets = tf.random.stateless_uniform((batch, 2), seeds[0], minval=0,
                                              maxval=2 * pad + 1, dtype=tf.int32)
        rows = offsets[:, :1] + tf.range(height)[None, :]  # (B, H) rows of each crop
        cols = offsets[:, 1:] + tf.range(width)[None, :]
        images = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2,
                           batch_dims=1)
    if info.horizontal_flip:
        flip = tf.random.stateless_uniform((batch,), seeds[1]) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    if config.cutout:
        images = cutout(images, config.length, seeds[2])
    return images


def cutout(images, length, seed):
    """Zero one square of side ``length`` in every image of a (B, H, W, C) batch, its
    centre uniform over the image, clipped at the borders."""
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    uniform = tf.random.stateless_uniform((tf.shape(images)[0], 2), seed=seed)
    centre = tf.cast(uniform * tf.constant([height, width], tf.float32), tf.int32)
    top = centre[:, 0, None, None] - length // 2  # (B, 1, 1)
    left = centre[:, 1, None, None] - length // 2
    rows = tf.range(height)[None, :, None]
    cols = tf.range(width)[None, None, :]
    inside = (rows >= top) & (rows < top + length) & (cols >= left) & (cols < left + length)
    return images * tf.cast(~inside, images.dtype)[..., None]


# ------------------------------------------------------- NumPy pipeline (no TensorFlow)
def tensorflow_available():
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def make_numpy_datasets(config, train, test, epoch_clock=None):
    """(train, test) as ``keras.utils.PyDataset``s of NumPy batches: the same
    normalisation and augmentation as ``make_datasets``, for machines without
    TensorFlow (JAX or torch backends). Deterministic under ``config.seed``."""
    info = dataset_info(config)
    return (NumpyBatches(train, info, config, augment=True, epoch_clock=epoch_clock),
            NumpyBatches(test, info, config.replace(batch_size=max(config.batch_size, 256)),
                         augment=False))


class NumpyBatches(keras.utils.PyDataset):
    """Shuffled (or, for test, ordered) batches of normalised, augmented NumPy images."""

    def __init__(self, split, info, config, augment, epoch_clock=None):
        super().__init__()
        self.images, self.labels = split
        self.info, self.config, self.augment = info, config, augment
        self.clock = epoch_clock
        self.epoch = 0
        self.order = self._epoch_order()

    def _epoch_order(self):
        if self.clock is not None and self.clock.epoch is not None:
            self.epoch = self.clock.epoch
        if not self.augment:
            return np.arange(len(self.images))
        return epoch_order(self.labels, self.config, self.epoch)

    def on_epoch_begin(self):
        self.order = self._epoch_order()

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
