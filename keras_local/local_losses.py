"""Registry of local loss functions: name -> which heads a block needs + how to combine them.

A local loss receives the block's heads, h (the block's activation before dropout),
the one-hot labels and beta, and returns a dict of named scalar terms. "loss" is the
one that trains the block; "pred_loss" / "sim_loss" are reported as metrics and
"scores" (class scores, B x num_classes) gives the local-head error.
Researchers add a new loss with ``@register_local_loss(name, heads=(...))``.
"""

import dataclasses
from typing import Callable

from keras_local.similarity import predsim_loss


@dataclasses.dataclass(frozen=True)
class LocalLoss:
    name: str
    heads: tuple  # subset of ("pred", "sim")
    compute: Callable


LOCAL_LOSSES = {}


def register_local_loss(name, heads):
    def decorator(compute):
        LOCAL_LOSSES[name] = LocalLoss(name=name, heads=tuple(heads), compute=compute)
        return compute

    return decorator


def get_local_loss(name):
    if name not in LOCAL_LOSSES:
        raise ValueError(f"unknown local loss {name!r}; choose one of {', '.join(LOCAL_LOSSES)}")
    return LOCAL_LOSSES[name]


@register_local_loss("pred", heads=("pred",))
def _pred(heads, h, labels_onehot, beta):
    loss, scores = heads["pred"].loss_and_scores(h, labels_onehot)
    return {"loss": loss, "pred_loss": loss, "scores": scores}


@register_local_loss("sim", heads=("sim",))
def _sim(heads, h, labels_onehot, beta):
    loss = heads["sim"].loss(h, labels_onehot)
    return {"loss": loss, "sim_loss": loss}


@register_local_loss("predsim", heads=("pred", "sim"))
def _predsim(heads, h, labels_onehot, beta):
    pred, scores = heads["pred"].loss_and_scores(h, labels_onehot)
    sim = heads["sim"].loss(h, labels_onehot)
    return {"loss": predsim_loss(pred, sim, beta), "pred_loss": pred, "sim_loss": sim,
            "scores": scores}
