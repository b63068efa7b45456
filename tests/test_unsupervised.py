"""The reference script's --alpha / --loss-unsup sim|recon, --no-similarity-std and
--classes-per-batch-until-epoch, each checked against what its definition implies."""

import numpy as np
import pytest

import keras_local as kl
from keras_local.data.pipeline import NumpyBatches, epoch_order, make_datasets
from keras_local.data.catalogue import get_dataset_info
from keras_local.layers.block import LocalBlock

from helpers import numpy_similarity, to_numpy


def numpy_cross_entropy(logits, labels):
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()


def to_float64(x):
    return to_numpy(x).astype(np.float64)


# --------------------------------------------------------------- --no-similarity-std
def test_similarity_without_std_flattens_feature_maps(rng):
    x = rng.normal(size=(5, 3, 3, 6)).astype("float32")
    flat = to_float64(kl.similarity_matrix(x, use_std=False))
    np.testing.assert_allclose(flat, numpy_similarity(x, use_std=False), atol=2e-6)
    assert not np.allclose(flat, numpy_similarity(x), atol=1e-3)  # the std form differs
    # Matrices and maps of <= 3 channels are flattened either way.
    y = rng.normal(size=(5, 3, 3, 2)).astype("float32")
    np.testing.assert_array_equal(to_float64(kl.similarity_matrix(y, use_std=False)),
                                  to_float64(kl.similarity_matrix(y)))


def test_no_similarity_std_reaches_the_sim_heads(rng):
    model = kl.build_model("vgg6a", (8, 8, 3), 4, kl.Config(
        num_layers=1, num_hidden=8, feat_mult=1 / 32, dim_in_decoder=32, similarity_std=False))
    block = model.local_blocks[1]
    assert not block.heads["sim"].similarity_std
    h = rng.normal(size=(6, 8, 8, 8)).astype("float32")
    labels = np.eye(4, dtype="float32")[rng.integers(0, 4, 6)]
    transformed = to_float64(block.heads["sim"](h))
    want = np.mean((numpy_similarity(transformed, use_std=False) - numpy_similarity(labels))**2)
    assert float(block.heads["sim"].loss(h, labels)) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------- --loss-unsup sim
def unsup_block(kind, width, input_shape, local_loss, unsup_loss, alpha, **kwargs):
    block = LocalBlock(kind, width, 4, local_loss=local_loss, unsup_loss=unsup_loss,
                       alpha=alpha, dim_in_decoder=4096, seed=7, name="b", **kwargs)
    block.build(input_shape)
    return block


def test_unsup_sim_term_is_mse_of_block_input_similarity(rng):
    """alpha * MSE(S(h), S(x)) + (1 - alpha) * pred, for a hand-made batch (the sim
    head's Dense set to the identity, so that its output is h itself)."""
    x = rng.normal(size=(6, 5)).astype("float32")
    h = np.maximum(rng.normal(size=(6, 4)), 0).astype("float32")
    labels = rng.integers(0, 4, 6)
    block = unsup_block("dense", 4, (None, 5), "pred", "unsup_sim", 0.3)
    block.heads["sim"].transform.kernel.assign(np.eye(4, dtype="float32"))
    loss = float(block.local_loss(x, h, np.eye(4, dtype="float32")[labels]))
    unsup = np.mean((numpy_similarity(h) - numpy_similarity(x))**2)
    pred = numpy_cross_entropy(to_float64(block.heads["pred"].dense.bias)[None].repeat(6, 0),
                               labels)  # zero kernel: the logits are the bias
    assert loss == pytest.approx(0.3 * unsup + 0.7 * pred, rel=1e-5)
    assert float(block.local_metrics["unsup_sim_loss"].result()) == pytest.approx(unsup,
                                                                                  rel=1e-5)
    assert unsup > 1e-2


def test_unsup_sim_on_feature_maps_uses_the_spatial_std(rng):
    """Bio blocks take S of h itself (no sim conv): the term is MSE(S(h), S(x)) with
    both feature maps reduced to their per-channel spatial std."""
    x = rng.normal(size=(5, 4, 4, 6)).astype("float32")
    h = rng.normal(size=(5, 4, 4, 8)).astype("float32")
    block = unsup_block("conv", 8, (None, 4, 4, 6), "sim", "unsup_sim", 1.0, bio=True)
    loss = float(block.local_loss(x, h, np.eye(4, dtype="float32")[[0, 1, 2, 3, 0]]))
    assert loss == pytest.approx(np.mean((numpy_similarity(h) - numpy_similarity(x))**2),
                                 rel=1e-5)


# ----------------------------------------------------------------- --loss-unsup recon
@pytest.mark.tensorflow_only
def test_recon_decoder_gradient_matches_hand_computation(rng):
    """recon = MSE(relu(h W + b), x): dW = hᵀ D, db = sum(D) with
    D = 2 (x_hat - x) 1[hW + b > 0] / (B * features); no gradient reaches x."""
    import tensorflow as tf

    x = rng.normal(size=(6, 5)).astype("float32")
    h = rng.normal(size=(6, 3)).astype("float32")
    block = unsup_block("dense", 3, (None, 5), "pred", "unsup_recon", 1.0)
    decoder = block.heads["decoder"].decoder
    x_tensor = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x_tensor)
        loss = block.local_loss(x_tensor, tf.constant(h), np.eye(4, dtype="float32")[[0] * 6])
    grad_w, grad_b = tape.gradient(loss, [decoder.kernel, decoder.bias])
    kernel, bias = to_float64(decoder.kernel), to_float64(decoder.bias)
    pre = h @ kernel + bias
    x_hat = np.maximum(pre, 0)
    assert float(loss) == pytest.approx(np.mean((x_hat - x)**2), rel=1e-5)
    delta = 2 * (x_hat - x) * (pre > 0) / x.size
    np.testing.assert_allclose(to_float64(grad_w), h.T @ delta, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(to_float64(grad_b), delta.sum(axis=0), rtol=1e-4, atol=1e-7)
    assert tape.gradient(loss, x_tensor) is None
    # PyTorch's default init of Linear(3, 5): U(+-1/sqrt(3)) for weight and bias.
    assert np.abs(kernel).max() <= 3**-0.5 and np.abs(bias).max() <= 3**-0.5


def test_recon_conv_decoder_and_first_layer(rng):
    conv = unsup_block("conv", 8, (None, 6, 6, 5), "pred", "unsup_recon", 0.5)
    h = rng.normal(size=(2, 6, 6, 8)).astype("float32")
    assert tuple(conv.heads["decoder"](h).shape) == (2, 6, 6, 5)  # ConvTranspose 'same'
    assert "recon_loss" in conv.local_metrics
    # The reference's first layer has no recon term but still weighs its loss by 1 - alpha.
    first = unsup_block("dense", 4, (None, 5), "pred", "unsup_recon", 0.25, first_layer=True)
    assert "decoder" not in first.heads and "recon_loss" not in first.local_metrics
    labels = rng.integers(0, 4, 6)
    loss = float(first.local_loss(rng.normal(size=(6, 5)).astype("float32"),
                                  rng.normal(size=(6, 4)).astype("float32"),
                                  np.eye(4, dtype="float32")[labels]))
    logits = to_float64(first.heads["pred"].dense.bias)[None].repeat(6, 0)
    assert loss == pytest.approx(0.75 * numpy_cross_entropy(logits, labels), rel=1e-5)


def test_unsup_terms_train_a_model_and_report_metrics(rng):
    config = kl.Config(num_layers=2, num_hidden=8, loss_unsup="recon", alpha=0.5)
    model = kl.build_model("mlp", (4, 4, 1), 4, config)
    model.compile()
    logs = model.train_on_batch(rng.normal(size=(8, 4, 4, 1)).astype("float32"),
                                rng.integers(0, 4, 8), return_dict=True)
    assert logs["block_2_recon_loss"] > 0 and "block_1_recon_loss" not in logs


# ---------------------------------------------------------- --classes-per-batch-until-epoch
def classes_per_batch(labels, order, batch_size):
    return [len(set(labels[order[i:i + batch_size]])) for i in range(0, len(order), batch_size)]


def test_class_limited_sampler_stops_after_the_given_epoch():
    labels = np.repeat(np.arange(8), 16)
    config = kl.Config(classes_per_batch=2, classes_per_batch_until_epoch=2, batch_size=16)
    counts = [classes_per_batch(labels, epoch_order(labels, config, epoch), 16)
              for epoch in range(4)]
    assert max(counts[0]) <= 2 and max(counts[1]) <= 2   # the reference's epochs 1 and 2
    assert min(counts[2]) > 2 and min(counts[3]) > 2     # then ordinary shuffling
    forever = config.replace(classes_per_batch_until_epoch=0)
    assert max(classes_per_batch(labels, epoch_order(labels, forever, 9), 16)) <= 2


def test_both_pipelines_switch_by_epoch():
    info = get_dataset_info("fashion_mnist_demo")
    labels = np.repeat(np.arange(8), 8).astype("int32")
    images = np.zeros((64,) + info.input_shape, np.uint8)
    config = kl.Config(dataset="fashion_mnist_demo", classes_per_batch=2,
                       classes_per_batch_until_epoch=1, batch_size=16)
    batches = NumpyBatches((images, labels), info, config, augment=True)
    first = [len(set(batches[i][1])) for i in range(len(batches))]
    batches.on_epoch_end()
    second = [len(set(batches[i][1])) for i in range(len(batches))]
    assert max(first) <= 2 and min(second) > 2
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return
    train, _ = make_datasets(config, (images, labels), (images, labels))
    epochs = [[len(set(y.numpy())) for _, y in train] for _ in range(2)]
    assert max(epochs[0]) <= 2 and min(epochs[1]) > 2


# ----------------------------------------------------------------- options and the CLI
@pytest.mark.parametrize("bad,message", [
    (dict(loss_unsup="pixels"), "unknown loss_unsup 'pixels'; choose one of none, sim, recon"),
    (dict(alpha=1.5), "alpha must be in"),
    (dict(classes_per_batch_until_epoch=-1), "classes_per_batch_until_epoch must be >= 0"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        kl.Config(**bad)


def test_cli_flags_become_config_fields():
    from keras_local.cli import train

    args = train.parse_args(["--alpha", "0.5", "--loss-unsup", "recon", "--no-similarity-std",
                             "--classes-per-batch", "20", "--classes-per-batch-until-epoch",
                             "200", "--recipe", "none"])
    config = kl.Config(**train.config_values(args))
    assert (config.alpha, config.loss_unsup, config.similarity_std,
            config.classes_per_batch_until_epoch) == (0.5, "recon", False, 200)
