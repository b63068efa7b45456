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

# The full dataset (Debian's dataset-fashion-mnist; .ci/run installs it). The variable lets
# a test run pretend it is absent: KERAS_LOCAL_FASHION_MNIST_DIR=/nonexistent python -m pytest
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    """The full Fashion-MNIST IDX files; tests that need them skip where they are absent."""
    directory = os.environ.get("KERAS_LOCAL_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    if not os.path.isfile(os.path.join(directory, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"needs the full Fashion-MNIST in {directory} "
                    f"(apt-get install dataset-fashion-mnist)")
    return directory


@pytest.fixture(scope="session")
def fashion_mnist_demo():
    """The embedded demo (real Fashion-MNIST images): ((8,000 train), (2,000 test)),
    raw uint8 images NHWC and int32 labels."""
    import keras_local as kl
    from keras_local.data import load_arrays

    return load_arrays(kl.Config(dataset="fashion_mnist_demo"))


@pytest.fixture(scope="session")
def fashion_mnist_idx_dir(fashion_mnist_demo, tmp_path_factory):
    """The demo written as canonical Fashion-MNIST files (gzip IDX, official names):
    8,000 train and 2,000 t10k images, for tests of ``--data-dir``."""
    from keras_local.data.idx import write_idx

    directory = tmp_path_factory.mktemp("fashion_mnist_idx")
    for prefix, (images, labels) in zip(("train", "t10k"), fashion_mnist_demo):
        write_idx(str(directory / f"{prefix}-images-idx3-ubyte.gz"), images[..., 0])
        write_idx(str(directory / f"{prefix}-labels-idx1-ubyte.gz"), labels.astype("uint8"))
    return str(directory)


@pytest.fixture(scope="session")
def fashion_mnist_small(fashion_mnist_demo):
    """The demo's 8,000 training and 2,000 test images, normalised, NHWC float32."""
    def normalise(images, labels):
        return ((images.astype("float32") / 255.0 - 0.286) / 0.353), labels.astype("int32")

    train, test = fashion_mnist_demo
    return normalise(*train), normalise(*test)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Two finished 2-epoch runs of a small mlp on 256 demo images, as ``train.py``
    writes them (no export): {"predsim": run dir, "backprop": run dir}."""
    import keras

    import keras_local as kl
    from keras_local.run.training import run

    save_dir = tmp_path_factory.mktemp("tiny_runs")
    runs = {}
    for mode in ("predsim", "backprop"):
        config = kl.Config(dataset="fashion_mnist_demo", model="mlp", num_layers=2,
                           num_hidden=16, epochs=2, batch_size=64, max_train_examples=256,
                           backprop=mode == "backprop", jit_compile=False, save_dir=str(save_dir),
                           similarity_examples=20, backend=keras.backend.backend())
        runs[mode] = run(config, verbose=0, export=False).run_dir
    return runs
