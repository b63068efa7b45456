"""Training and test batches: tf.data pipelines (normalisation, augmentation, class-limited
sampling) and their NumPy twin for machines without TensorFlow."""

import keras
import numpy as np

from keras_local.data.catalogue import get_dataset_info


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


def epoch_order(labels, config, epoch, rng):
    """The example order of 0-based ``epoch`` of the training set."""
    if classes_limited_in_epoch(config, epoch):
        return class_limited_order(labels, config.classes_per_batch, config.batch_size, rng)
    return rng.permutation(len(labels))


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
            epoch = next(epoch_counter)
            rng = np.random.default_rng([config.seed, epoch])
            for index in epoch_order(y_train, config, epoch, rng):
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
        return epoch_order(self.labels, self.config, self.epoch, rng)

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
