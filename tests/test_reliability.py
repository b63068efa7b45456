"""Reliability promises (README "Reliability"): nothing lost, nothing blown up.

One test per break of issue 15: outputs never replace their inputs, readers bound what
a file may make them allocate before allocating, exported files are verified before use,
resume decides from what is on disk and is exact, bad input is one line and exit 2."""

import csv
import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_local  # noqa: F401  (registers LocalModel for load_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
TINY = ["--dataset", "fashion_mnist_demo", "--model", "mlp", "--num-layers", "1",
        "--num-hidden", "32", "--max-train-examples", "512", "--batch-size", "64",
        "--dropout", "0.2", "--cutout", "--length", "8", "--seed", "3",
        "--lr-decay-milestones", "2", "--no-export", "--quiet", "--deterministic"]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def only_run_dir(save_dir):
    runs = glob.glob(os.path.join(save_dir, "*"))
    assert len(runs) == 1, runs
    return runs[0]


def weights(run_dir, name="model.keras"):
    model = keras.models.load_model(os.path.join(run_dir, name))
    return model, [keras.ops.convert_to_numpy(v) for v in model.weights]


def history_epochs(run_dir):
    return [int(row["epoch"]) for row in
            csv.DictReader(open(os.path.join(run_dir, "history.csv")))]


# ------------------------------------------------------------------ resume (breaks 4, 7)
def test_sigkill_mid_epoch_2_then_resume_gives_the_uninterrupted_weights(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    result = run("train.py", *TINY, "--epochs", "3", "--save-dir", straight)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run("tests/kill_mid_epoch.py", "2", "4", *TINY, "--epochs", "3",
                 "--save-dir", killed)
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL
    run_dir = only_run_dir(killed)
    assert not os.path.exists(os.path.join(run_dir, "results.json"))
    assert history_epochs(run_dir) == [0]
    result = run("train.py", "--resume", run_dir, "--quiet", "--no-export")
    assert result.returncode == 0, result.stderr[-2000:]
    assert history_epochs(run_dir) == [0, 1, 2]

    reference, expected = weights(only_run_dir(straight))
    resumed, actual = weights(run_dir)
    assert int(resumed.optimizer.iterations) == int(reference.optimizer.iterations) == 24
    for a, b, variable in zip(actual, expected, reference.weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=variable.path)
