"""Every training option in one dataclass; defaults are the reference script's."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

LOSS_SUP_CHOICES = ("pred", "sim", "predsim")
LOSS_UNSUP_CHOICES = ("none", "sim", "recon")
NONLIN_CHOICES = ("relu", "leakyrelu")
OPTIM_CHOICES = ("adam", "amsgrad", "sgd", "keras_adam")
PRECISION_CHOICES = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGY_CHOICES = ("auto", "one", "mirrored", "multiworker")
PLACEMENT_CHOICES = ("none", "layerwise")
BACKEND_CHOICES = ("tensorflow", "jax", "torch")


@dataclasses.dataclass
class Config:
    """All options of a keras-local run.

    Field names follow the reference script's flags (``--lr-decay-milestones`` is
    ``lr_decay_milestones``). ``training_mode`` derives the update rule from
    ``loss_sup``, ``backprop`` and ``no_detach``.
    """

    # data
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    max_train_examples: Optional[int] = None
    cutout: bool = False
    length: int = 16
    classes_per_batch: int = 0
    classes_per_batch_until_epoch: int = 0  # 0: every epoch; N: epochs 1..N, then shuffled
    # model
    model: str = "vgg8b"
    num_layers: int = 1
    num_hidden: int = 1024
    feat_mult: float = 1.0
    batch_norm: bool = True
    nonlin: str = "relu"
    dropout: float = 0.0
    dim_in_decoder: int = 4096
    # local learning
    loss_sup: str = "predsim"
    beta: float = 0.99
    backprop: bool = False
    no_detach: bool = False
    bio: bool = False
    target_proj_size: int = 128
    alpha: float = 0.0  # block loss = alpha * unsupervised + (1 - alpha) * supervised
    loss_unsup: str = "none"
    similarity_std: bool = True  # the reference's --no-similarity-std sets False
    # optimisation
    batch_size: int = 128
    epochs: int = 400
    lr: float = 5e-4
    lr_decay_milestones: tuple = (200, 300, 350, 375)
    lr_decay_fact: float = 0.25
    optim: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    # execution
    seed: int = 1
    jit_compile: bool = True
    precision: str = "float32"
    save_dir: str = "runs"
    resume: Optional[str] = None
    backend: str = "tensorflow"
    # scale-out
    strategy: str = "auto"
    placement: str = "none"
    pipeline: bool = False
    # the paper recipe (keras_local.recipes) these options started from, if any
    recipe: Optional[str] = None

    def __post_init__(self):
        self.lr_decay_milestones = tuple(int(m) for m in self.lr_decay_milestones)
        _check_choice("loss_sup", self.loss_sup, LOSS_SUP_CHOICES)
        _check_choice("loss_unsup", self.loss_unsup, LOSS_UNSUP_CHOICES)
        _check_choice("nonlin", self.nonlin, NONLIN_CHOICES)
        _check_choice("optim", self.optim, OPTIM_CHOICES)
        _check_choice("precision", self.precision, PRECISION_CHOICES)
        _check_choice("strategy", self.strategy, STRATEGY_CHOICES)
        _check_choice("placement", self.placement, PLACEMENT_CHOICES)
        _check_choice("backend", self.backend, BACKEND_CHOICES)
        if self.pipeline and self.placement != "layerwise":
            raise ValueError("pipeline needs placement='layerwise'")
        if self.backprop and self.no_detach:
            raise ValueError("backprop and no_detach are exclusive: choose one")
        if self.bio and self.backprop:
            raise ValueError("bio needs local losses: it cannot be combined with backprop")
        _check_range("beta", self.beta, 0.0, 1.0)
        _check_range("alpha", self.alpha, 0.0, 1.0)
        if self.classes_per_batch_until_epoch < 0:
            raise ValueError(f"classes_per_batch_until_epoch must be >= 0, "
                             f"got {self.classes_per_batch_until_epoch}")
        _check_range("dropout", self.dropout, 0.0, 1.0, upper_open=True)
        _check_positive("batch_size", self.batch_size)
        _check_positive("epochs", self.epochs)
        _check_positive("num_hidden", self.num_hidden)
        _check_positive("dim_in_decoder", self.dim_in_decoder)
        _check_positive("target_proj_size", self.target_proj_size)
        _check_positive("lr", self.lr)
        _check_positive("feat_mult", self.feat_mult)
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.weight_decay and self.optim == "keras_adam":
            raise ValueError(f"weight_decay {self.weight_decay} needs optim adam, amsgrad or "
                             f"sgd (coupled L2, as PyTorch); keras_adam has none")
        if list(self.lr_decay_milestones) != sorted(self.lr_decay_milestones):
            raise ValueError(
                f"lr_decay_milestones must be increasing, got {list(self.lr_decay_milestones)}"
            )
        if self.max_train_examples is not None:
            _check_positive("max_train_examples", self.max_train_examples)

    @property
    def training_mode(self) -> str:
        """'backprop', 'no_detach' or the local loss name ('pred', 'sim', 'predsim')."""
        if self.backprop:
            return "backprop"
        if self.no_detach:
            return "no_detach"
        return self.loss_sup

    @property
    def output_loss_scale(self) -> float:
        """The output layer's cross-entropy weight: 1 - beta in local predsim, else 1."""
        if self.loss_sup == "predsim" and not self.backprop:
            return 1.0 - self.beta
        return 1.0

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["lr_decay_milestones"] = list(self.lr_decay_milestones)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_positive(name, value):
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_range(name, value, low, high, upper_open=False):
    ok = low <= value < high if upper_open else low <= value <= high
    if not ok:
        bracket = ")" if upper_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
