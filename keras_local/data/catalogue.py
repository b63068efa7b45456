"""What each supported dataset is: shape, classes, normalisation, augmentation (docs/method.md section 9)."""

import dataclasses

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    tfds_name: str
    input_shape: tuple
    num_classes: int
    mean: tuple
    std: tuple
    crop_padding: int = 0     # random crop of the input size after zero padding; 0 = none
    horizontal_flip: bool = False
    class_names: tuple = ()

    def to_dict(self):
        values = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in values.items()}


def _digits():
    return tuple(str(i) for i in range(10))


DATASETS = {}


def register_dataset(info):
    """Add ``info`` (a DatasetInfo) to the catalogue under ``info.name``."""
    if info.name in DATASETS:
        raise ValueError(f"dataset {info.name!r} is already registered")
    DATASETS[info.name] = info
    return info


for _info in [
        DatasetInfo("mnist", "mnist", (28, 28, 1), 10, (0.1307,), (0.3081,), crop_padding=2,
                    class_names=_digits()),
        DatasetInfo("fashion_mnist", "fashion_mnist", (28, 28, 1), 10, (0.286,), (0.353,),
                    crop_padding=2, horizontal_flip=True, class_names=FASHION_MNIST_CLASSES),
        DatasetInfo("fashion_mnist_demo", "fashion_mnist", (28, 28, 1), 10, (0.286,), (0.353,),
                    crop_padding=2, horizontal_flip=True, class_names=FASHION_MNIST_CLASSES),
        DatasetInfo("kmnist", "kmnist", (28, 28, 1), 10, (0.1904,), (0.3475,),
                    class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
        DatasetInfo("cifar10", "cifar10", (32, 32, 3), 10, (0.424, 0.415, 0.384),
                    (0.283, 0.278, 0.284), crop_padding=4, horizontal_flip=True,
                    class_names=CIFAR10_CLASSES),
        DatasetInfo("cifar100", "cifar100", (32, 32, 3), 100, (0.438, 0.418, 0.377),
                    (0.300, 0.287, 0.294), crop_padding=4, horizontal_flip=True),
        DatasetInfo("svhn", "svhn_cropped", (32, 32, 3), 10, (0.431, 0.430, 0.446),
                    (0.197, 0.198, 0.199), class_names=_digits()),
        DatasetInfo("stl10", "stl10", (96, 96, 3), 10, (0.447, 0.440, 0.407),
                    (0.260, 0.257, 0.271),
                    class_names=("airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                 "monkey", "ship", "truck")),
        # Image folders (keras_local.data.folders): shape, classes and normalisation come
        # from the folder and the Config (dataset_info), these are the defaults.
        DatasetInfo("folder", "", (32, 32, 3), 0, (), ()),
        DatasetInfo("imagenet", "", (224, 224, 3), 1000, (0.485, 0.456, 0.406),
                    (0.229, 0.224, 0.225)),
]:
    register_dataset(_info)


def list_datasets():
    """Every dataset name ``--dataset`` accepts."""
    return list(DATASETS)


def get_dataset_info(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_info(config):
    """The DatasetInfo of ``config.dataset``; for image folders ("folder", "imagenet") the
    shape, classes and normalisation the folder scan stored in the Config
    (``keras_local.data.folders.describe_folder``)."""
    info = get_dataset_info(config.dataset)
    if config.dataset not in ("folder", "imagenet"):
        return info
    size = config.image_size or info.input_shape[0]
    return dataclasses.replace(
        info, input_shape=(size, size, 3),
        num_classes=len(config.class_names) or info.num_classes,
        mean=tuple(config.data_mean) or info.mean, std=tuple(config.data_std) or info.std,
        crop_padding=size // 8 if size <= 64 else 0, horizontal_flip=True,
        class_names=tuple(config.class_names))


def normalise(images, info):
    """uint8 [0, 255] -> (x / 255 - mean) / std, float32."""
    import tensorflow as tf

    mean = tf.constant(info.mean, tf.float32)
    std = tf.constant(info.std, tf.float32)
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std
