import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKENDS = ("tensorflow", "jax", "torch")


def pytest_addoption(parser):
    parser.addoption(
        "--backend", choices=BACKENDS, default=None,
        help="Keras backend to run the tests on (sets KERAS_BACKEND before Keras is "
             "imported; default: $KERAS_BACKEND, else tensorflow). Tests marked "
             "tensorflow_only are skipped on the other backends.")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tensorflow_only: needs the tensorflow backend (tf.GradientTape, tf.data, ...)")
    backend = config.getoption("--backend")
    if backend is None:
        return
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != backend:
        raise pytest.UsageError(f"--backend {backend}: Keras was imported before on "
                                f"{sys.modules['keras'].backend.backend()!r}")
    os.environ["KERAS_BACKEND"] = backend


def pytest_collection_modifyitems(config, items):
    backend = os.environ["KERAS_BACKEND"]
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"tensorflow_only; running on {backend}")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def input_gradient():
    """``input_gradient(fn, x)``: d sum(fn(x)) / dx as NumPy, on the current backend."""
    import keras

    def gradient(fn, x):
        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            return np.asarray(jax.grad(lambda t: keras.ops.sum(fn(t)))(x))
        if backend == "torch":
            import torch

            t = torch.tensor(x, requires_grad=True)
            keras.ops.sum(fn(t)).backward()
            return t.grad.numpy()
        import tensorflow as tf

        t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(t)
            total = keras.ops.sum(fn(t))
        return tape.gradient(total, t).numpy()

    return gradient

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"{FASHION_MNIST_DIR} missing: apt-get install -y dataset-fashion-mnist")
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def fashion_mnist_small(fashion_mnist_dir):
    """First 10,000 training and all 10,000 test images, normalised, NHWC float32."""
    from keras_local.data.idx import read_idx

    def load(prefix, limit=None):
        images = read_idx(f"{fashion_mnist_dir}/{prefix}-images-idx3-ubyte.gz", limit)
        labels = read_idx(f"{fashion_mnist_dir}/{prefix}-labels-idx1-ubyte.gz", limit)
        images = ((images.astype("float32") / 255.0 - 0.286) / 0.353)[..., None]
        return images, labels.astype("int32")

    return load("train", 10000), load("t10k")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
