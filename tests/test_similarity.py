import numpy as np
import pytest
from keras import ops

from keras_local.losses.maths import (
    binary_pred_loss,
    error_percent,
    pred_loss,
    predsim_loss,
    sim_loss,
    similarity_matrix,
)

from helpers import numpy_similarity


@pytest.mark.parametrize("shape", [(6, 20), (5, 4, 4, 8), (5, 4, 4, 3), (4, 1, 1, 16), (3, 7)])
def test_similarity_matrix_matches_numpy(shape, rng):
    x = rng.normal(size=shape).astype("float32")
    got = ops.convert_to_numpy(similarity_matrix(x))
    np.testing.assert_allclose(got, numpy_similarity(x), atol=2e-6)
    assert got.shape == (shape[0], shape[0])


def test_feature_map_uses_spatial_std_not_flattening(rng):
    x = rng.normal(size=(4, 3, 3, 6)).astype("float32")
    flat = numpy_similarity(x.reshape(4, -1))
    got = ops.convert_to_numpy(similarity_matrix(x))
    assert not np.allclose(got, flat, atol=1e-3)


def test_constant_channel_has_finite_gradient(input_gradient):
    grad = input_gradient(similarity_matrix, np.zeros((3, 4, 4, 5), dtype="float32"))
    assert np.all(np.isfinite(grad))


def test_sim_loss_is_mse_of_similarity_matrices(rng):
    features = rng.normal(size=(6, 4, 4, 8)).astype("float32")
    labels = np.eye(3, dtype="float32")[rng.integers(0, 3, size=6)]
    expected = np.mean((numpy_similarity(features) - numpy_similarity(labels)) ** 2)
    np.testing.assert_allclose(float(sim_loss(features, labels)), expected, rtol=1e-5)


def test_pred_loss_is_mean_cross_entropy(rng):
    logits = rng.normal(size=(5, 4)).astype("float32")
    labels = rng.integers(0, 4, size=5)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(5), labels].mean()
    got = float(pred_loss(logits, np.eye(4, dtype="float32")[labels]))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_binary_pred_loss_is_mean_sigmoid_bce(rng):
    logits = rng.normal(size=(5, 7)).astype("float32") * 4
    targets = (rng.random(size=(5, 7)) > 0.5).astype("float32")
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = -np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    np.testing.assert_allclose(float(binary_pred_loss(logits, targets)), expected, rtol=1e-5)


def test_binary_pred_loss_gradient_at_zero_logits(input_gradient):
    # The bio pred head starts at zero weights, so every logit is exactly 0 on the first
    # step: the gradient there must be (sigmoid(0) - t) / size, as PyTorch's
    # binary_cross_entropy_with_logits gives, not -t / size (a kink taken as flat).
    targets = np.array([[1, 0, 1, 0]], dtype="float32")
    grad = input_gradient(lambda z: binary_pred_loss(z, targets), np.zeros((1, 4), "float32"))
    np.testing.assert_allclose(grad, [[-0.125, 0.125, -0.125, 0.125]], rtol=1e-6)
    assert float(binary_pred_loss(np.zeros((1, 4), "float32"), targets)) == pytest.approx(
        np.log(2.0), rel=1e-6)


def test_binary_pred_loss_at_large_logits(input_gradient):
    logits = np.array([[-200.0, -200.0, 200.0, 200.0, -30.0, 30.0]], dtype="float32")
    targets = np.array([[0, 1, 0, 1, 0, 1]], dtype="float32")
    # Per entry: loss softplus(z) - z t, gradient (sigmoid(z) - t) / 6.
    expected_loss = (0 + 200 + 200 + 0 + np.log1p(np.exp(-30.0)) * 2) / 6
    loss = float(binary_pred_loss(logits, targets))
    assert np.isfinite(loss) and loss == pytest.approx(expected_loss, rel=1e-6)
    grad = input_gradient(lambda z: binary_pred_loss(z, targets), logits)
    sigmoid = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(grad, (sigmoid - targets) / 6, rtol=1e-5, atol=1e-12)


def test_predsim_weights_terms_by_beta():
    assert float(predsim_loss(2.0, 4.0, 0.99)) == pytest.approx(0.01 * 2.0 + 0.99 * 4.0)


def test_error_percent():
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype="float32")
    assert float(error_percent(logits, np.array([0, 1, 1, 1]))) == pytest.approx(25.0)
