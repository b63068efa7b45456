"""The registry of local losses: name -> the heads a block needs, the terms it reports,
and how it combines them. Free of Keras imports, so that the CLI can list the names
before a backend is chosen; the maths lives in ``keras_local.losses.maths`` and the heads.

Researchers add a loss with ``@register_local_loss(name, heads=(...), metrics=(...))``
in their own module (``train.py --plugin MODULE`` imports it), then select it by name
(``Config(loss_sup=name)``, ``--loss-sup name``).
"""

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class LocalLossInputs:
    """What a local loss may read: the block's heads, its input, h (its activation before
    dropout), the one-hot labels, beta, the block itself (for any further option), and
    the heads' summaries of h where the block computed them (``summary``)."""

    heads: dict
    inputs: object
    h: object
    labels_onehot: object
    beta: float
    block: object = None
    summaries: dict = None

    def summary(self, head):
        """What ``head`` reads of h, computed already (None: the head reads h itself):
        "pred": the pooled map, "sim": the rows of S (``losses.similarity_rows``)."""
        return (self.summaries or {}).get(head)


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
    loss, scores = x.heads["pred"].loss_and_scores(x.h, x.labels_onehot, x.summary("pred"))
    return {"loss": loss, "pred_loss": loss, "scores": scores}


@register_local_loss("sim", heads=("sim",))
def _sim(x):
    loss = x.heads["sim"].loss(x.h, x.labels_onehot, x.summary("sim"))
    return {"loss": loss, "sim_loss": loss}


@register_local_loss("predsim", heads=("pred", "sim"))
def _predsim(x):
    from keras_local.losses.maths import predsim_loss  # Keras maths; imported when training

    pred, scores = x.heads["pred"].loss_and_scores(x.h, x.labels_onehot, x.summary("pred"))
    sim = x.heads["sim"].loss(x.h, x.labels_onehot, x.summary("sim"))
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
