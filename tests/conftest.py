import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"{FASHION_MNIST_DIR} missing: apt-get install -y dataset-fashion-mnist")
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def fashion_mnist_small(fashion_mnist_dir):
    """First 10,000 training and all 10,000 test images, normalised, NHWC float32."""
    from keras_local.idx import read_idx

    def load(prefix, limit=None):
        images = read_idx(f"{fashion_mnist_dir}/{prefix}-images-idx3-ubyte.gz", limit)
        labels = read_idx(f"{fashion_mnist_dir}/{prefix}-labels-idx1-ubyte.gz", limit)
        images = ((images.astype("float32") / 255.0 - 0.286) / 0.353)[..., None]
        return images, labels.astype("int32")

    return load("train", 10000), load("t10k")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
