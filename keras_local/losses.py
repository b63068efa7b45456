"""The similarity matrix, the local loss functions (REFERENCE.md section 1) and their registry.

Only ``keras.ops`` is used, so every function runs on each Keras 3 backend.
Inputs are channels-last (NHWC) feature maps or (batch, features) matrices.
"""

import dataclasses
from typing import Callable

from keras import ops

NORM_EPSILON = 1e-8


def spatial_std(x):
    """Per-channel standard deviation over the spatial positions (ddof=1).

    x: (B, H, W, C) -> (B, C). A channel that is constant gets std 0 and a zero
    gradient (a plain sqrt would give an infinite one).
    """
    batch, height, width, channels = _static_shape(x)
    positions = height * width
    flat = ops.reshape(x, (-1, positions, channels))
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
    x = ops.cast(x, "float32")
    if use_std and len(x.shape) == 4 and x.shape[-1] > 3 and x.shape[1] > 1:
        z = spatial_std(x)
    else:
        z = ops.reshape(x, (ops.shape(x)[0], -1))
    z = z - ops.mean(z, axis=1, keepdims=True)
    norm = ops.sqrt(ops.sum(ops.square(z), axis=1, keepdims=True))
    z = z / (NORM_EPSILON + norm)
    return ops.clip(ops.matmul(z, ops.transpose(z)), -1.0, 1.0)


def sim_loss(features, targets, use_std=True):
    """Mean squared error between S(features) and S(targets), over all B*B entries.

    The target similarity carries no gradient.
    """
    target_similarity = ops.stop_gradient(similarity_matrix(targets, use_std))
    return ops.mean(ops.square(similarity_matrix(features, use_std) - target_similarity))


def pred_loss(logits, labels_onehot):
    """Softmax cross-entropy with one-hot labels, mean over the batch."""
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    return -ops.mean(ops.sum(ops.cast(labels_onehot, "float32") * log_probs, axis=-1))


def binary_pred_loss(logits, binary_targets):
    """Sigmoid binary cross-entropy with {0, 1} targets, mean over all entries."""
    logits = ops.cast(logits, "float32")
    # max(z, 0) - z*t + log(1 + exp(-|z|)): the stable form of BCE with logits.
    losses = ops.relu(logits) - logits * binary_targets + ops.log1p(ops.exp(-ops.abs(logits)))
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


# ------------------------------------------------------- local loss registry
@dataclasses.dataclass(frozen=True)
class LocalLossInputs:
    """What a local loss may read: the block's heads, its input, h (its activation before
    dropout), the one-hot labels, beta, and the block itself (for any further option)."""

    heads: dict
    inputs: object
    h: object
    labels_onehot: object
    beta: float
    block: object = None


@dataclasses.dataclass(frozen=True)
class LocalLoss:
    """A registered local loss: the heads a block needs, the scalar terms reported as block
    metrics (``<block>_<term>``), and ``compute(LocalLossInputs) -> dict`` of terms.

    ``compute`` returns "loss" (what trains the block), every name of ``metrics``, and
    optionally "scores" (class scores, B x num_classes) for the local-head error.
    """

    name: str
    heads: tuple  # subset of ("pred", "sim", "decoder")
    metrics: tuple
    compute: Callable


LOCAL_LOSSES = {}


def register_local_loss(name, heads, metrics=None):
    """Register ``compute`` under ``name`` (decorator). ``metrics``: the terms reported
    per block; default "pred_loss" / "sim_loss" for the heads used."""
    if metrics is None:
        metrics = tuple(f"{head}_loss" for head in heads)

    def decorator(compute):
        LOCAL_LOSSES[name] = LocalLoss(name=name, heads=tuple(heads), metrics=tuple(metrics),
                                       compute=compute)
        return compute

    return decorator


def list_local_losses():
    return list(LOCAL_LOSSES)


def get_local_loss(name):
    if name not in LOCAL_LOSSES:
        raise ValueError(f"unknown local loss {name!r}; choose one of {', '.join(LOCAL_LOSSES)}")
    return LOCAL_LOSSES[name]


@register_local_loss("pred", heads=("pred",))
def _pred(x):
    loss, scores = x.heads["pred"].loss_and_scores(x.h, x.labels_onehot)
    return {"loss": loss, "pred_loss": loss, "scores": scores}


@register_local_loss("sim", heads=("sim",))
def _sim(x):
    loss = x.heads["sim"].loss(x.h, x.labels_onehot)
    return {"loss": loss, "sim_loss": loss}


@register_local_loss("predsim", heads=("pred", "sim"))
def _predsim(x):
    pred, scores = x.heads["pred"].loss_and_scores(x.h, x.labels_onehot)
    sim = x.heads["sim"].loss(x.h, x.labels_onehot)
    return {"loss": predsim_loss(pred, sim, x.beta), "pred_loss": pred, "sim_loss": sim,
            "scores": scores}


# Unsupervised terms (the reference's --loss-unsup): a block with one of them trains on
# alpha * unsupervised + (1 - alpha) * supervised (``LocalBlock.local_loss``).
@register_local_loss("unsup_sim", heads=("sim",), metrics=("unsup_sim_loss",))
def _unsup_sim(x):
    """MSE(S(sim_head(h)), S(block input)): the examples keep the similarity structure
    they had at the block's input."""
    loss = x.heads["sim"].input_similarity_loss(x.h, x.inputs)
    return {"loss": loss, "unsup_sim_loss": loss}


@register_local_loss("unsup_recon", heads=("decoder",), metrics=("recon_loss",))
def _unsup_recon(x):
    """MSE(act(decoder(h)), block input): a reconstruction of the block's input."""
    loss = x.heads["decoder"].loss(x.h, x.inputs)
    return {"loss": loss, "recon_loss": loss}
