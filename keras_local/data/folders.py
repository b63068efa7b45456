"""Image folders: ``--dataset folder --data-dir DIR`` and ``--dataset imagenet``.

Layout: ``DIR/train/<class>/*.jpg|jpeg|png|bmp|gif`` and ``DIR/val/<class>/...`` (or
``DIR/test/``); class names are the folder names, sorted (as ``keras.utils.
image_dataset_from_directory`` and torchvision's ImageFolder order them).

- Small images (``image_size`` <= 64, default 32 for "folder"): every image is decoded
  (``tf.io.decode_image``, RGB) and resized to image_size x image_size once; the arrays
  then take the built-in datasets' path (random crop after zero padding image_size // 8,
  horizontal flip), normalised per channel with the training images' mean and std.
- Large images (``image_size`` > 64; "imagenet" defaults to 224): files are streamed and
  decoded by tf.data with the authors' ImageNet transforms: random resized crop (area
  8%-100%, aspect 3/4-4/3) + horizontal flip for training; resize to 256/224 x
  image_size + centre crop for evaluation. Mean and std come from up to
  ``STATS_SAMPLE`` training images unless given ("imagenet": ImageNet's).

What the scan finds (class names, image size, mean and std) is stored in the Config
(``describe_folder``), so ``config.json``, resume and the export's metadata keep it.
"""

import os
import warnings

import numpy as np

from keras_local.data.idx import DataFileError

FOLDER_DATASETS = ("folder", "imagenet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SMALL_IMAGE_LIMIT = 64
DEFAULT_SIZE = {"folder": 32, "imagenet": 224}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_SAMPLE = 1000
LAYOUT = "DIR/train/<class>/*.jpg|png and DIR/val/<class>/ (or DIR/test/)"
# The formats tf.io.decode_image reads, as Pillow names them (Pillow reads their headers).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF")


def printable(text):
    """``text`` with its control characters (ANSI escapes, newlines) shown as escapes, as
    ``repr`` writes them, so that printing a folder or class name never drives the
    terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def is_folder_dataset(name):
    return name in FOLDER_DATASETS


def image_size(config):
    return config.image_size or DEFAULT_SIZE[config.dataset]


def is_large(config):
    return image_size(config) > SMALL_IMAGE_LIMIT


# ---------------------------------------------------------------------- scanning
def _split_dirs(data_dir, dataset):
    if not data_dir:
        raise DataFileError(f"--dataset {dataset} needs --data-dir DIR ({LAYOUT})")
    if not os.path.isdir(data_dir):
        raise DataFileError(f"--data-dir {data_dir} does not exist")
    train = os.path.join(data_dir, "train")
    if not os.path.isdir(train):
        raise DataFileError(f"--data-dir {data_dir} has no train/ folder ({LAYOUT})")
    for name in ("val", "test"):
        if os.path.isdir(os.path.join(data_dir, name)):
            return train, os.path.join(data_dir, name)
    raise DataFileError(f"--data-dir {data_dir} has neither val/ nor test/ ({LAYOUT})")


def _classes(split_dir):
    """(class folder names, hidden folders skipped) of ``split_dir``."""
    folders = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    classes = [name for name in folders if not name.startswith(".")]
    if not classes:
        raise DataFileError(f"{printable(split_dir)} has no class subfolders ({LAYOUT})")
    return classes, [os.path.join(split_dir, name) for name in folders if name.startswith(".")]


def scan_split(split_dir, classes):
    """(paths, labels) of every image under ``split_dir/<class>/`` (sorted, recursive)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for root, dirs, files in os.walk(os.path.join(split_dir, name)):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files)
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise DataFileError(f"{printable(os.path.join(split_dir, name))}: no images "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
        paths += found
        labels += [label] * len(found)
    return np.asarray(paths), np.asarray(labels, dtype=np.int32)


def scan(config):
    """(class names, (train paths, labels), (val paths, labels)); one-line DataFileError
    for a bad folder (no train/ or val/, no class folders, differing classes)."""
    train_dir, val_dir = _split_dirs(config.data_dir, config.dataset)
    classes, skipped = _classes(train_dir)
    val_classes, val_skipped = _classes(val_dir)
    if skipped or val_skipped:
        warnings.warn(f"hidden folders skipped (not classes): "
                      f"{', '.join(printable(path) for path in skipped + val_skipped)}",
                      stacklevel=3)
    if classes != val_classes:
        raise DataFileError(
            f"class folders differ between {printable(train_dir)} "
            f"({', '.join(map(printable, classes))}) and {printable(val_dir)} "
            f"({', '.join(map(printable, val_classes))})")
    if len(classes) < 2:
        raise DataFileError(f"{printable(train_dir)} has one class folder "
                            f"({printable(classes[0])}): a dataset needs two or more classes")
    if config.dataset == "imagenet" and len(classes) != 1000:
        raise DataFileError(f"--dataset imagenet needs ImageNet's 1000 class folders, "
                            f"{train_dir} has {len(classes)}; use --dataset folder")
    return classes, scan_split(train_dir, classes), scan_split(val_dir, classes)


def check_image_file(path):
    """One-line DataFileError for a file that cannot be read (a symlink loop, no
    permission), is not a JPEG, PNG, BMP or GIF image, or has more pixels than Pillow's
    decompression-bomb bound (the bound of ``python -m export.predict``); only the header
    is read (Pillow decodes nothing until asked)."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=IMAGE_FORMATS):
                pass
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataFileError(f"{printable(path)}: image larger than "
                                f"{Image.MAX_IMAGE_PIXELS:,} pixels") from None
        except UnidentifiedImageError:
            raise DataFileError(f"{printable(path)}: cannot decode the image (not a JPEG, "
                                f"PNG, BMP or GIF image)") from None
        except (OSError, SyntaxError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error).strip()[:120]
            raise DataFileError(f"{printable(path)}: cannot read the image ({reason})") \
                from None


# ---------------------------------------------------------------------- decoding
def decode(path, size, large):
    """An image file as uint8 RGB pixels: resized to size x size (small), or resized so
    its shorter side is 256/224 x size and centre-cropped (large, evaluation transform)."""
    import tensorflow as tf

    check_image_file(path)
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataFileError(f"{printable(path)}: cannot decode the image "
                            f"({message[:120]})") from None
    if large:
        return tf.cast(tf.round(centre_crop(image, size)), tf.uint8).numpy()
    return tf.cast(tf.round(tf.image.resize(image, (size, size), antialias=True)),
                   tf.uint8).numpy()


def centre_crop(image, size):
    """Resize the shorter side to round(size * 256 / 224), crop the centre size x size."""
    import tensorflow as tf

    resize = round(size * 256 / 224)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new, antialias=True)
    top = (new[0] - size) // 2
    left = (new[1] - size) // 2
    return tf.clip_by_value(image[top:top + size, left:left + size], 0.0, 255.0)


def random_resized_crop(image, size, seed):
    """The training transform for large images: a random crop of 8%-100% of the area
    with aspect ratio 3/4-4/3, resized to size x size, then a random horizontal flip."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seeds[0], area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, extent)
    crop = tf.image.resize(crop, (size, size), antialias=True)
    crop = tf.clip_by_value(crop, 0.0, 255.0)
    return tf.image.stateless_random_flip_left_right(crop, seed=seeds[1])


def load_folder(config):
    """((train x, y), (val x, y)): uint8 arrays for small images, file paths for large."""
    _, train, val = scan(config)
    size, large = image_size(config), is_large(config)
    if large:
        for path in np.concatenate([train[0], val[0]]):
            check_image_file(path)
        return train, val
    return tuple((np.stack([decode(p, size, False) for p in paths]), labels)
                 for paths, labels in (train, val))


def describe_folder(config):
    """``config`` with what the folder defines filled in: class names, image size, and
    the per-channel mean / std of the training images (unless given)."""
    classes, train, _ = scan(config)
    size = image_size(config)
    mean, std = config.data_mean, config.data_std
    if not mean and config.dataset == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if not mean:
        paths = train[0]
        if len(paths) > STATS_SAMPLE:
            paths = np.random.default_rng(config.seed).choice(paths, STATS_SAMPLE, replace=False)
        pixels = np.stack([decode(p, size, is_large(config)) for p in paths])
        pixels = pixels.reshape(-1, 3).astype(np.float64) / 255.0
        mean = tuple(float(v) for v in pixels.mean(axis=0))
        std = tuple(float(max(v, 1e-3)) for v in pixels.std(axis=0))
    return config.replace(image_size=size, class_names=tuple(classes), data_mean=tuple(mean),
                          data_std=tuple(std))


def check_images(config, split, limit=64):
    """Raw-pixel evaluation images of ``split`` for the export's parity check."""
    images = split[0][:limit]
    if images.dtype.kind in "US":
        return np.stack([decode(p, image_size(config), True) for p in images]).astype("float32")
    return images


# ---------------------------------------------------------------------- pipelines
def make_folder_datasets(config, info, train, test):
    """tf.data pipelines streaming large images from their files (module docstring)."""
    import tensorflow as tf

    from keras_local.data.catalogue import normalise

    size = image_size(config)
    autotune = tf.data.AUTOTUNE

    def read(path):
        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)

    def train_map(example, seed):
        path, label = example
        image = random_resized_crop(tf.cast(read(path), tf.float32), size, seed)
        image = tf.ensure_shape(image, (size, size, 3))
        return normalise(image, info), label

    def test_map(path, label):
        image = tf.ensure_shape(centre_crop(tf.cast(read(path), tf.float32), size),
                                (size, size, 3))
        return normalise(image, info), label

    examples = tf.data.Dataset.from_tensor_slices(train).shuffle(
        len(train[0]), seed=config.seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True).batch(2)
    train_ds = (tf.data.Dataset.zip((examples, seeds))
                .map(train_map, num_parallel_calls=autotune, deterministic=True)
                .batch(config.batch_size).prefetch(autotune))
    test_ds = (tf.data.Dataset.from_tensor_slices(test)
               .map(test_map, num_parallel_calls=autotune)
               .batch(config.batch_size).prefetch(autotune))
    return train_ds, test_ds
