"""Plain helpers shared by the test files and by the scripts they run in subprocesses
(``python tests/SCRIPT.py`` puts this folder on the path too). Fixtures live in
conftest.py. Keras and keras_local are imported inside the functions: a subprocess
picks its backend before Keras is imported.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# For subprocesses that run the repository's scripts: this checkout's keras_local
# first, TensorFlow's start-up chatter off.
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}


def train_main(argv):
    """The training CLI's ``main(argv)``: what ``keras-local-train`` and ``train.py`` run.
    Its exit code."""
    from keras_local.cli.train import main

    return main(argv)


def run_python(*args, timeout=300):
    """``python ARGS`` in the repository root with ``ENV``; the CompletedProcess (text)."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def console_script(name):
    """The installed console script ``name`` (``pip install -e .`` puts it beside the
    interpreter)."""
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    assert path, f"console script {name} not installed: pip install -e '.[dev]' first"
    return path


def one_line_error(capsys):
    """What the code under test wrote to stderr, asserted to be one line, no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def help_text(parser):
    """An argparse parser's help with white space folded (independent of the terminal width)."""
    return " ".join(parser.format_help().split())


def only_run_dir(save_dir):
    """The one run directory a single run wrote below ``save_dir``."""
    runs = [os.path.join(save_dir, name) for name in os.listdir(save_dir)]
    assert len(runs) == 1, runs
    return runs[0]


def read_json(path):
    """The JSON document in the file ``path`` (closed again: no ResourceWarning)."""
    with open(path) as stream:
        return json.load(stream)


def history_rows(run_dir):
    """The rows of a run's history.csv, as dicts of strings."""
    with open(os.path.join(run_dir, "history.csv"), newline="") as stream:
        return list(csv.DictReader(stream))


def history_epochs(run_dir):
    """The epoch column of a run's history.csv."""
    return [int(row["epoch"]) for row in history_rows(run_dir)]


def to_numpy(x):
    """A tensor's or a Keras variable's value as NumPy, on any backend. A variable is
    read with ``.numpy()``: ``keras.ops.convert_to_numpy`` on a TensorFlow variable makes
    NumPy 2 warn that ``__array__`` takes no ``copy`` keyword."""
    import keras

    if isinstance(x, keras.Variable):
        return x.numpy()
    return keras.ops.convert_to_numpy(x)


def weights_by_path(model):
    """A model's weight values (NumPy) keyed by their path inside it (without the
    model's own name), so that two builds of one architecture compare key by key."""
    return {v.path.split("/", 1)[1]: v.numpy() for v in model.weights}


def backbone_params(model):
    """Trainable parameters of the inference model (no heads): the paper's counts."""
    return sum(int(np.prod(v.shape)) for v in model.inference_model().trainable_weights)


def normalise_fashion_mnist(raw):
    """Raw Fashion-MNIST pixels (0-255) normalised as the training pipeline does, float32."""
    from keras_local.data.catalogue import get_dataset_info

    info = get_dataset_info("fashion_mnist")
    return ((raw / 255.0 - np.float32(info.mean)) / np.float32(info.std)).astype("float32")


def numpy_similarity(x, use_std=True):
    """docs/method.md section 3 in float64 NumPy, for x given NHWC or flat: a conv
    output with more than 3 channels and more than one row is first reduced to each
    channel's standard deviation over the positions (when ``use_std``), then each
    example is centred and scaled to unit length, and the matrix is their cosines."""
    x = np.asarray(x, dtype=np.float64)
    if use_std and x.ndim == 4 and x.shape[-1] > 3 and x.shape[1] > 1:
        b, h, w, c = x.shape
        z = x.reshape(b, h * w, c).std(axis=1, ddof=1)
    else:
        # Flattening NHWC instead of PyTorch's NCHW permutes each row's features,
        # which leaves the centred cosines unchanged.
        z = x.reshape(x.shape[0], -1)
    z = z - z.mean(axis=1, keepdims=True)
    z = z / (1e-8 + np.sqrt((z**2).sum(axis=1, keepdims=True)))
    return np.clip(z @ z.T, -1, 1)


def fashion_mnist_mlp_error(data, seed=1, **changes):
    """Test error (%) of the paper's 3x1024 mlp recipe options (docs/method.md section
    10) with ``changes``, after 2 epochs on ``data`` (the conftest fixture
    ``fashion_mnist_small``: normalised demo images)."""
    import keras

    import keras_local as kl

    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    config = kl.Config(num_layers=3, num_hidden=1024, dropout=0.1, nonlin="leakyrelu",
                       lr=5e-4, **changes)
    model = kl.build_model("mlp", (28, 28, 1), 10, config)
    model.compile()
    model.fit(x_train, y_train, batch_size=128, epochs=2, verbose=0)
    return model.evaluate(x_test, y_test, batch_size=500, verbose=0, return_dict=True)["error"]
