"""The similarity matrix and the local loss functions (docs/method.md sections 2 and 3).

Only ``keras.ops`` is used, so every function runs on each Keras 3 backend.
Inputs are channels-last (NHWC) feature maps or (batch, features) matrices.
"""

from keras import ops

from keras_local.kernels import fast_paths

NORM_EPSILON = 1e-8


def spatial_std(x):
    """Per-channel standard deviation over the spatial positions (ddof=1).

    x: (B, H, W, C) -> (B, C). A channel that is constant gets std 0 and a zero
    gradient (a plain sqrt would give an infinite one).
    """
    batch, height, width, channels = _static_shape(x)
    positions = height * width
    flat = ops.reshape(x, (-1, positions, channels))
    fast = fast_paths().spatial_std(flat)  # same values; one full-size map less kept
    if fast is not None:
        return fast
    centred = flat - ops.mean(flat, axis=1, keepdims=True)
    variance = ops.sum(ops.square(centred), axis=1) / (positions - 1)
    positive = variance > 0
    safe_variance = ops.where(positive, variance, ops.ones_like(variance))
    return ops.where(positive, ops.sqrt(safe_variance), ops.zeros_like(variance))


def similarity_matrix(x, use_std=True):
    """Adjusted cosine similarity of the examples of a batch, shape (B, B).

    Feature maps with more than 3 channels and spatial size above 1 are reduced to
    the per-channel spatial std first (unless ``use_std`` is False: the reference's
    ``--no-similarity-std``); everything else is flattened. Rows are centred, divided
    by (1e-8 + their L2 norm), and S = X Xᵀ is clipped to [-1, 1].
    """
    return similarity_of_rows(similarity_rows(x, use_std))


def similarity_rows(x, use_std=True):
    """The rows that ``similarity_matrix`` compares, (B, D): the per-channel spatial std
    of a feature map (see ``similarity_matrix``), or ``x`` flattened."""
    x = ops.cast(x, "float32")
    if uses_spatial_std(x.shape, use_std):
        return spatial_std(x)
    return ops.reshape(x, (ops.shape(x)[0], -1))


def uses_spatial_std(shape, use_std=True):
    """Whether ``similarity_rows`` reduces an input of ``shape`` to its spatial std: a
    feature map with more than 3 channels and spatial size above 1, and ``use_std``."""
    return use_std and len(shape) == 4 and shape[-1] > 3 and shape[1] > 1


def similarity_of_rows(rows):
    """S of ``similarity_rows``' output: rows centred and L2-normalised, products clipped."""
    z = rows - ops.mean(rows, axis=1, keepdims=True)
    norm = ops.sqrt(ops.sum(ops.square(z), axis=1, keepdims=True))
    z = z / (NORM_EPSILON + norm)
    return ops.clip(ops.matmul(z, ops.transpose(z)), -1.0, 1.0)


def sim_loss(features, targets, use_std=True):
    """Mean squared error between S(features) and S(targets), over all B*B entries.

    The target similarity carries no gradient.
    """
    return sim_loss_of_rows(similarity_rows(features, use_std), targets, use_std)


def sim_loss_of_rows(feature_rows, targets, use_std=True):
    """``sim_loss`` from the features' ``similarity_rows``, computed already."""
    target_similarity = ops.stop_gradient(similarity_matrix(targets, use_std))
    return ops.mean(ops.square(similarity_of_rows(feature_rows) - target_similarity))


def pred_loss(logits, labels_onehot):
    """Softmax cross-entropy with one-hot labels, mean over the batch."""
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    return -ops.mean(ops.sum(ops.cast(labels_onehot, "float32") * log_probs, axis=-1))


def binary_pred_loss(logits, binary_targets):
    """Sigmoid binary cross-entropy with {0, 1} targets, mean over all entries; its
    gradient is (sigmoid(logits) - targets) / size everywhere, at logit 0 included."""
    logits = ops.cast(logits, "float32")
    # softplus(z) - z*t, not the textbook max(z, 0) - z*t + log1p(exp(-|z|)): autodiff
    # takes the derivative of max and |.| at 0 as 0, so that form's gradient at z = 0 is
    # -t instead of sigmoid(0) - t, and a pred head whose weights start at zero has
    # every logit at exactly 0 on its first step.
    losses = ops.softplus(logits) - logits * ops.cast(binary_targets, "float32")
    return ops.mean(losses)


def predsim_loss(pred, sim, beta):
    """(1 - beta) * pred + beta * sim."""
    return (1.0 - beta) * pred + beta * sim


def error_percent(logits, labels):
    """Percentage of examples whose argmax differs from the integer label."""
    predicted = ops.argmax(logits, axis=-1)
    wrong = ops.not_equal(ops.cast(predicted, "int32"), ops.cast(labels, "int32"))
    return 100.0 * ops.mean(ops.cast(wrong, "float32"))


def _static_shape(x):
    shape = tuple(x.shape)
    if any(dim is None for dim in shape[1:]):
        raise ValueError(f"similarity_matrix needs static spatial sizes, got shape {shape}")
    return shape
