"""benchmarks/exactness.py: its weight conversion to the authors' layouts and its argument
errors (the comparison itself needs the authors' script and torch; run by hand)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import keras_local as kl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import exactness  # noqa: E402


def test_missing_reference_folder_is_one_clear_error(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "exactness.py"),
                           "--reference", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 2
    assert f"--reference {str(tmp_path)!r}: no train.py there" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.tensorflow_only
def test_weight_map_gives_the_authors_layouts_and_the_same_products(rng):
    config = kl.Config(model="vgg6a", feat_mult=1 / 32, num_hidden=8, dim_in_decoder=64)
    model = kl.build_model("vgg6a", (8, 8, 3), 4, config)
    entries = exactness.weight_map(model)
    weights = exactness.keras_weights(model)
    assert {path for path, *_ in entries} == set(weights)
    names = {path: name for path, name, *_ in entries}
    # vgg6a = [128, M, 256, M, 512, M, 512]: the convs are features.0, 2, 4, 6.
    assert names["block_3/block_3_encoder/kernel"] == "features.4.encoder.weight"
    assert names["block_5/block_5_sim_head/dense/kernel"] == "classifier.layers.0.linear_loss.weight"
    assert names["output/bias"] == "classifier.layer_out.bias"
    for path, name, to_torch, from_torch in entries:
        value = rng.normal(size=weights[path].shape)
        np.testing.assert_array_equal(from_torch(to_torch(value)), value, err_msg=path)
    converted = {path: to_torch(weights[path]) for path, _, to_torch, _ in entries}
    assert converted["block_1/block_1_encoder/kernel"].shape == (4, 3, 3, 3)  # OIHW
    assert converted["output/kernel"].shape == (4, 8)  # (out, in)
    # The pred head of block 1 reads a pooled 4x4x4 map: PyTorch flattens it channels
    # first, Keras channels last; the converted weights give the same logits.
    path = "block_1/block_1_pred_head/dense/kernel"
    pooled = rng.normal(size=(5, 4, 4, 4))
    kernel = rng.normal(size=weights[path].shape)
    to_torch = next(to for p, _, to, _ in entries if p == path)
    np.testing.assert_allclose(pooled.reshape(5, -1) @ kernel,
                               pooled.transpose(0, 3, 1, 2).reshape(5, -1) @ to_torch(kernel).T)
