"""Registries are the one source of names: the CLI offers what they hold, a local loss
registered outside the library trains through train.py's code path and reports its terms."""

import csv
import glob
import os
import subprocess
import sys
import textwrap

import pytest
from keras import ops

import keras_local as kl
from keras_local.losses.registry import LocalLossInputs, get_local_loss

from helpers import ROOT, train_main

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
TINY = ["--dataset", "fashion_mnist_demo", "--model", "mlp", "--num-layers", "2",
        "--num-hidden", "32", "--max-train-examples", "512", "--batch-size", "64",
        "--no-export", "--quiet"]


@kl.register_local_loss("pred_l2", heads=("pred",), metrics=("pred_loss", "activation_l2"))
def pred_plus_activation_l2(x: LocalLossInputs):
    """pred plus an L2 penalty on the block's activations."""
    pred, scores = x.heads["pred"].loss_and_scores(x.h, x.labels_onehot)
    activation_l2 = ops.mean(ops.square(x.h))
    return {"loss": pred + 0.01 * activation_l2, "pred_loss": pred,
            "activation_l2": activation_l2, "scores": scores}


def test_help_lists_the_registries_without_starting_a_backend():
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        sys.path.insert(0, {ROOT!r})
        import train
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                train.parse_args(["--help"])
            except SystemExit:
                pass
        loaded = [m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules]
        print("LOADED", loaded)
        print(out.getvalue())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    help_text = " ".join(result.stdout.split())
    built_in_losses = [name for name in kl.list_local_losses() if name != "pred_l2"]
    for name in kl.list_models() + kl.list_datasets() + built_in_losses:
        assert name in help_text, name


def test_user_local_loss_trains_through_train_py_and_reports_its_term(tmp_path):
    assert "pred_l2" in kl.list_local_losses()
    save_dir = tmp_path / "runs"
    assert train_main(TINY + ["--loss-sup", "pred_l2", "--epochs", "2", "--save-dir",
                              str(save_dir)]) == 0
    (run_dir,) = glob.glob(str(save_dir / "*"))
    with open(os.path.join(run_dir, "history.csv")) as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2
    for block in ("block_1", "block_2"):
        values = [float(row[f"{block}_activation_l2"]) for row in rows]
        assert all(value > 0 for value in values)
        assert f"{block}_pred_loss" in rows[0] and f"{block}_error" in rows[0]
        assert f"{block}_sim_loss" not in rows[0]


def test_registered_loss_computes_its_terms():
    import numpy as np

    block = kl.LocalBlock("dense", 4, 3, local_loss="pred_l2", name="probe")
    block.build((None, 5))
    block.heads["pred"].dense.bias.assign(np.zeros(3, "float32"))  # PyTorch init is random
    h = np.full((2, 4), 2.0, "float32")
    labels = np.eye(3, dtype="float32")[[0, 1]]
    terms = get_local_loss("pred_l2").compute(LocalLossInputs(
        heads=block.heads, inputs=None, h=h, labels_onehot=labels, beta=0.99, block=block))
    # pred head zero-initialised: uniform scores, cross-entropy log(3); L2 of 2.0 is 4.0
    np.testing.assert_allclose(float(terms["pred_loss"]), np.log(3.0), rtol=1e-6)
    np.testing.assert_allclose(float(terms["activation_l2"]), 4.0, rtol=1e-6)
    np.testing.assert_allclose(float(terms["loss"]), np.log(3.0) + 0.04, rtol=1e-6)


@pytest.mark.slow  # train.py in a subprocess
def test_plugin_option_makes_a_loss_selectable(tmp_path):
    plugin = tmp_path / "my_losses.py"
    plugin.write_text(textwrap.dedent("""
        import keras_local as kl

        @kl.register_local_loss("sim_only_plugin", heads=("sim",))
        def sim_only(x):
            loss = x.heads["sim"].loss(x.h, x.labels_onehot)
            return {"loss": loss, "sim_loss": loss}
    """))
    save_dir = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--epochs", "1",
         "--max-train-examples", "128", "--plugin", str(plugin), "--loss-sup",
         "sim_only_plugin", "--save-dir", str(save_dir)],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = glob.glob(str(save_dir / "*"))
    with open(os.path.join(run_dir, "history.csv")) as stream:
        header = next(csv.reader(stream))
    assert "block_1_sim_loss" in header and "block_1_pred_loss" not in header


def test_missing_plugin_is_a_one_line_error(tmp_path, capsys):
    save_dir = tmp_path / "runs"
    assert train_main([*TINY, "--plugin", "no_such_plugin_mod", "--save-dir", str(save_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot import plugin 'no_such_plugin_mod'" in err and len(err.splitlines()) == 1, err
    assert not save_dir.exists()
