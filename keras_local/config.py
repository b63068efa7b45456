"""Every training option in one dataclass; defaults are the reference script's."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Optional

from keras_local.losses.registry import list_local_losses

LOSS_UNSUP_CHOICES = ("none", "sim", "recon")
NONLIN_CHOICES = ("relu", "leakyrelu")
OPTIM_CHOICES = ("adam", "amsgrad", "sgd", "keras_adam")
PRECISION_CHOICES = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGY_CHOICES = ("auto", "one", "mirrored", "multiworker")
PLACEMENT_CHOICES = ("none", "layerwise")
BACKEND_CHOICES = ("tensorflow", "jax", "torch")
# Fields that count something: whole numbers (a config file may hold anything).
INTEGER_FIELDS = ("max_train_examples", "length", "classes_per_batch", "image_size",
                  "classes_per_batch_until_epoch", "num_layers", "num_hidden", "dim_in_decoder",
                  "target_proj_size", "modules", "batch_size", "epochs", "seed",
                  "steps_per_execution", "similarity_examples")
# Steps per call of the train function when pipelined: inside one call the runtime
# overlaps the end of one step (its last stages' updates) with the start of the next.
PIPELINE_STEPS_PER_EXECUTION = 16


# The network part of a Config: what a saved model carries (LocalModel.get_config). Every
# other field describes a run (data, schedule, outputs, devices) and lives in the run's
# config.json only, so that a .keras file holds no paths of the machine that trained it.
NETWORK_FIELDS = ("model", "num_layers", "num_hidden", "feat_mult", "batch_norm", "nonlin",
                  "dropout", "dim_in_decoder", "loss_sup", "beta", "backprop", "no_detach",
                  "bio", "target_proj_size", "precision", "seed", "pre_act", "modules")


@dataclasses.dataclass
class Config:
    """All options of a keras-local run: its network part (``NETWORK_FIELDS``,
    ``network_dict()``) and its run part (``run_dict()``).

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
    # image folders (dataset "folder" / "imagenet"): the side images are resized/cropped
    # to, and what the folder scan found (filled in by training.prepare, kept for export)
    image_size: Optional[int] = None
    data_mean: tuple = ()   # per-channel normalisation; () = computed from the training images
    data_std: tuple = ()
    class_names: tuple = ()
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
    pre_act: bool = False   # ResNets: BN -> act -> conv in the basic blocks
    # local learning
    loss_sup: str = "predsim"
    beta: float = 0.99
    backprop: bool = False
    no_detach: bool = False
    bio: bool = False
    target_proj_size: int = 128
    modules: Optional[int] = None  # K local modules of consecutive layers; None = every layer
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
    plugins: tuple = ()  # modules imported first (train.py --plugin); --resume re-imports
    # scale-out
    strategy: str = "auto"
    placement: str = "none"
    pipeline: bool = False
    # training steps per call of the compiled train function (Keras steps_per_execution);
    # 0 = auto: PIPELINE_STEPS_PER_EXECUTION when pipelined, else 1
    steps_per_execution: int = 0
    # reproducibility
    deterministic: bool = False  # tf.config.experimental.enable_op_determinism()
    # TensorBoard
    similarity_examples: int = 64  # test images of the per-block similarity images; 0 = none
    # the paper recipe (keras_local.recipes) these options started from, if any
    recipe: Optional[str] = None

    def __post_init__(self):
        for name in INTEGER_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        self.lr_decay_milestones = tuple(int(m) for m in self.lr_decay_milestones)
        self.plugins = tuple(self.plugins)
        _check_choice("loss_sup", self.loss_sup, list_local_losses())
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
        for name in ("lr", "weight_decay", "momentum", "lr_decay_fact", "feat_mult", "beta",
                     "dropout"):
            _check_finite(name, getattr(self, name))
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the similarity matrix and BatchNorm "
                             f"compare the examples of a batch), got {self.batch_size}")
        _check_positive("length", self.length)
        if self.classes_per_batch < 0:
            raise ValueError(f"classes_per_batch must be >= 0 (0 = ordinary shuffling), "
                             f"got {self.classes_per_batch}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if self.steps_per_execution < 0:
            raise ValueError(f"steps_per_execution must be >= 0 (0 = auto), "
                             f"got {self.steps_per_execution}")
        if self.similarity_examples < 0:
            raise ValueError(f"similarity_examples must be >= 0, got {self.similarity_examples}")
        self.data_mean = tuple(float(v) for v in self.data_mean)
        self.data_std = tuple(float(v) for v in self.data_std)
        self.class_names = tuple(str(v) for v in self.class_names)
        if len(self.data_mean) != len(self.data_std):
            raise ValueError(f"data_mean {list(self.data_mean)} and data_std "
                             f"{list(self.data_std)} need one value per channel each")
        if any(not v > 0 for v in self.data_std):
            raise ValueError(f"data_std must be > 0, got {list(self.data_std)}")
        if self.image_size is not None:
            _check_positive("image_size", self.image_size)
        if self.modules is not None:
            _check_positive("modules", self.modules)

    @property
    def training_mode(self) -> str:
        """'backprop', 'no_detach' or the local loss name ('pred', 'sim', 'predsim')."""
        if self.backprop:
            return "backprop"
        if self.no_detach:
            return "no_detach"
        return self.loss_sup

    @property
    def resolved_steps_per_execution(self) -> int:
        """``steps_per_execution``, with 0 (auto) resolved."""
        if self.steps_per_execution:
            return self.steps_per_execution
        return PIPELINE_STEPS_PER_EXECUTION if self.pipeline else 1

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
        for key in ("data_mean", "data_std", "class_names"):
            values[key] = list(values[key])
        values["plugins"] = list(self.plugins)
        return values

    def network_dict(self) -> dict:
        """The options that describe the network (saved with the model)."""
        values = self.to_dict()
        return {name: values[name] for name in NETWORK_FIELDS}

    def run_dict(self) -> dict:
        """The options that describe a run (data, schedule, outputs, devices)."""
        values = self.to_dict()
        return {name: value for name, value in values.items() if name not in NETWORK_FIELDS}

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


def _check_finite(name, value):
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def _check_positive(name, value):
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_range(name, value, low, high, upper_open=False):
    ok = low <= value < high if upper_open else low <= value <= high
    if not ok:
        bracket = ")" if upper_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
