"""Every training option, declared once: a field of ``NetworkConfig`` (what a saved model
carries) or of ``RunConfig`` (data, schedule, outputs, devices); ``Config`` is both. Each
field carries its help text, its ``--help`` group and, where it has them, its choices:
``keras_local.cli.train`` generates the command line from them. Defaults are the reference
script's. Importing this module imports no backend (``--help`` needs it)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Optional

LOSS_UNSUP_CHOICES = ("none", "sim", "recon")
NONLIN_CHOICES = ("relu", "leakyrelu")
OPTIM_CHOICES = ("adam", "amsgrad", "sgd", "keras_adam")
PRECISION_CHOICES = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGY_CHOICES = ("auto", "one", "mirrored", "multiworker")
PLACEMENT_CHOICES = ("none", "layerwise")
BACKEND_CHOICES = ("tensorflow", "jax", "torch")
# Steps per call of the train function when pipelined: inside one call the runtime
# overlaps the end of one step (its last stages' updates) with the start of the next.
PIPELINE_STEPS_PER_EXECUTION = 16
# The --help sections, in this order; a field may name a new one (it then comes last).
GROUPS = ("data", "model", "local learning", "optimisation", "run", "devices",
          "the paper's recipes")


# Registry choices are read when the parser is made, after plugins have registered theirs.
def _datasets():
    from keras_local.data.catalogue import list_datasets

    return tuple(list_datasets())


def _models():
    from keras_local.models.registry import list_models

    return tuple(list_models())


def _local_losses():
    from keras_local.losses.registry import list_local_losses

    return tuple(list_local_losses())


def option(default, help, group, choices=None, flag=None, metavar=None, cli=True,
           repeat=False, hparam=False):
    """A Config field with what its command-line option needs.

    help: the ``--help`` text; ``{choices}`` in it is replaced by the choices.
    group: the ``--help`` section (``GROUPS``).
    choices: a tuple, or a function returning the names of a registry.
    flag: the option's name when it is not the field's dashed name. A bool is a switch:
        ``--name`` sets True when it defaults to False; when it defaults to True,
        ``--no-name`` (or ``flag``, e.g. ``--no-jit``) sets False, and ``help`` says what
        that flag does.
    cli: False for a field that is not a command-line option (the help says who sets it).
    repeat: a tuple field given one value per use of its flag (``--plugin A --plugin B``).
    hparam: the option defines the experiment (a column of TensorBoard's HParams table;
        paths, devices and output options do not).
    """
    metadata = dict(help=help, group=group, choices=choices, flag=flag, metavar=metavar,
                    cli=cli, repeat=repeat, hparam=hparam)
    return dataclasses.field(default=default, metadata=metadata)


def choices_of(field):
    """The allowed values of a field (a tuple), or None when any value goes."""
    choices = field.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


@dataclasses.dataclass
class NetworkConfig:
    """The options that define the network: saved with the model (``LocalModel.get_config``)
    and all a loaded model knows. ``training_mode`` derives the update rule from
    ``loss_sup``, ``backprop`` and ``no_detach``."""

    model: str = option("vgg8b", "one of {choices}", "model", choices=_models, metavar="NAME",
                        hparam=True)
    num_layers: int = option(1, "fully connected local blocks (after the convs for vgg*)",
                             "model", hparam=True)
    num_hidden: int = option(1024, "units per FC block", "model", hparam=True)
    feat_mult: float = option(1.0, "VGG / ResNet channel multiplier", "model", hparam=True)
    pre_act: bool = option(False, "ResNets: pre-activation basic blocks (BN -> act -> conv)",
                           "model", hparam=True)
    batch_norm: bool = option(True, "no BatchNorm", "model", hparam=True)
    nonlin: str = option("relu", "activation", "model", choices=NONLIN_CHOICES, hparam=True)
    dropout: float = option(0.0, "dropout after each block (spatial for conv blocks)", "model",
                            hparam=True)
    dim_in_decoder: int = option(4096, "max input size of the pred head after average "
                                       "pooling", "model", hparam=True)
    loss_sup: str = option("predsim", "local loss, one of {choices}", "local learning",
                           choices=_local_losses, metavar="NAME", hparam=True)
    modules: Optional[int] = option(
        None, "group the local layers into K modules of consecutive layers, heads on each "
              "module's last layer (default: every layer its own module; 1 = end-to-end with "
              "one auxiliary head)", "local learning", metavar="K", hparam=True)
    beta: float = option(0.99, "predsim weight of sim", "local learning", hparam=True)
    backprop: bool = option(False, "baseline: global backprop, no local heads",
                            "local learning")
    no_detach: bool = option(False, "local losses, but gradients also cross blocks",
                             "local learning")
    bio: bool = option(False, "back-prop free: feedback alignment, no sim conv, random label "
                              "projection", "local learning", hparam=True)
    target_proj_size: int = option(128, "size of the random label projection (--bio)",
                                   "local learning", hparam=True)
    loss_unsup: str = option("none", "unsupervised local term: sim = MSE(S(h), S(block "
                                     "input)), recon = reconstruction of the block input",
                             "local learning", choices=LOSS_UNSUP_CHOICES, hparam=True)
    alpha: float = option(0.0, "block loss = alpha * unsupervised + (1 - alpha) * supervised",
                          "local learning", hparam=True)
    similarity_std: bool = option(True, "similarity of feature maps on the flattened maps, "
                                        "not on the per-channel spatial std",
                                  "local learning", flag="--no-similarity-std", hparam=True)
    seed: int = option(1, "random seed of weights, data order and dropout", "run", hparam=True)
    precision: str = option("float32", "float32 or a mixed-precision policy", "devices",
                            choices=PRECISION_CHOICES, hparam=True)

    def __post_init__(self):
        _check_fields(self, NetworkConfig)
        if self.backprop and self.no_detach:
            raise ValueError("backprop and no_detach are exclusive: choose one")
        if self.bio and self.backprop:
            raise ValueError("bio needs local losses: it cannot be combined with backprop")
        _check_range("beta", self.beta, 0.0, 1.0)
        _check_range("alpha", self.alpha, 0.0, 1.0)
        _check_range("dropout", self.dropout, 0.0, 1.0, upper_open=True)
        _check_positive("num_hidden", self.num_hidden)
        _check_positive("dim_in_decoder", self.dim_in_decoder)
        _check_positive("target_proj_size", self.target_proj_size)
        _check_positive("feat_mult", self.feat_mult)
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")
        for name in ("feat_mult", "beta", "dropout"):
            _check_finite(name, getattr(self, name))
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
    def output_loss_scale(self) -> float:
        """The output layer's cross-entropy weight: 1 - beta in local predsim, else 1."""
        if self.loss_sup == "predsim" and not self.backprop:
            return 1.0 - self.beta
        return 1.0

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def network_dict(self) -> dict:
        """The options that describe the network (saved with the model)."""
        return {name: _plain(getattr(self, name)) for name in NETWORK_FIELDS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


@dataclasses.dataclass
class RunConfig:
    """The options of one run (data, schedule, outputs, devices): kept in the run's
    ``config.json``, never in a model file, so that a ``.keras`` file holds no paths of
    the machine that trained it."""

    dataset: str = option("cifar10", "one of {choices}", "data", choices=_datasets,
                          metavar="NAME", hparam=True)
    data_dir: Optional[str] = option(
        None, "offline distribution files (MNIST-family IDX .gz, CIFAR python batches), a "
              "tensorflow-datasets data dir, or for --dataset folder/imagenet "
              "DIR/train/<class>/*.jpg|png and DIR/val/ (or test/)", "data")
    image_size: Optional[int] = option(
        None, "image folders: side of the square inputs (default 32 for folder, 224 for "
              "imagenet; above 64: random resized crop / resize + centre crop)", "data",
              hparam=True)
    data_mean: tuple[float, ...] = option(
        (), "image folders: per-channel mean in [0, 1] (default: computed from the training "
            "images)", "data", metavar="M")
    data_std: tuple[float, ...] = option(
        (), "image folders: per-channel std (default: computed)", "data", metavar="S")
    class_names: tuple[str, ...] = option(
        (), "image folders: the class folders found (set by the run from the folder scan, "
            "kept for the export)", "data", cli=False)
    max_train_examples: Optional[int] = option(
        None, "use only the first N training images (quick runs; default: all)", "data",
        hparam=True)
    cutout: bool = option(False, "cutout augmentation", "data", hparam=True)
    length: int = option(16, "cutout square side", "data", hparam=True)
    classes_per_batch: int = option(0, "batches with only N distinct classes (0 = ordinary "
                                       "shuffling)", "data", hparam=True)
    classes_per_batch_until_epoch: int = option(
        0, "limit the classes per batch until this epoch (0: until the end)", "data", hparam=True)
    batch_size: int = option(128, "examples per training batch", "optimisation", hparam=True)
    epochs: int = option(400, "training epochs", "optimisation", hparam=True)
    lr: float = option(5e-4, "initial learning rate", "optimisation", hparam=True)
    lr_decay_milestones: tuple[int, ...] = option((200, 300, 350, 375),
                                                  "epochs at which lr is decayed",
                                                  "optimisation", hparam=True)
    lr_decay_fact: float = option(0.25, "factor of each lr decay", "optimisation", hparam=True)
    optim: str = option("adam", "PyTorch's Adam / AMSGrad / SGD (as the reference); "
                                "keras_adam: Keras's Adam (epsilon before bias correction)",
                        "optimisation", choices=OPTIM_CHOICES, hparam=True)
    momentum: float = option(0.0, "SGD momentum", "optimisation", hparam=True)
    weight_decay: float = option(0.0, "L2 weight decay", "optimisation", hparam=True)
    plugins: tuple[str, ...] = option(
        (), "import MODULE (dotted name or .py file) first: the local losses, models and "
            "datasets it registers become choices (repeatable)", "run", flag="--plugin",
        metavar="MODULE", repeat=True)
    save_dir: str = option("runs", "parent of the run directories", "run")
    resume: Optional[str] = option(None, "continue a run from its last completed epoch", "run",
                                   metavar="RUN_DIR")
    similarity_examples: int = option(
        64, "test images whose similarity matrix TensorBoard shows for every block after "
            "each epoch (0 = none)", "run", metavar="N")
    backend: str = option("tensorflow", "Keras backend", "devices", choices=BACKEND_CHOICES)
    jit_compile: bool = option(True, "do not compile with XLA", "devices", flag="--no-jit")
    strategy: str = option("auto", "tf.distribute strategy (auto: mirrored on >1 GPU, "
                                   "multiworker when TF_CONFIG names several workers)",
                           "devices", choices=STRATEGY_CHOICES)
    placement: str = option("none", "layerwise: block i on device i mod N", "devices",
                            choices=PLACEMENT_CHOICES)
    pipeline: bool = option(False, "decoupled pipelined training (needs --placement "
                                   "layerwise)", "devices", hparam=True)
    steps_per_execution: int = option(
        0, "training steps per call of the compiled train function (0 = auto: "
           f"{PIPELINE_STEPS_PER_EXECUTION} when pipelined, else 1)", "devices", metavar="N")
    xla_cache: str = option(
        "~/.cache/keras-local/xla", "folder where TensorFlow's XLA keeps the programs it "
        "compiles, per TensorFlow version and CPU, so that a later run (a resume, the same "
        "network again) skips their compilation before its first step; 'none': off",
        "devices", metavar="DIR")
    deterministic: bool = option(False, "deterministic TensorFlow kernels "
                                        "(enable_op_determinism): bit-identical reruns and "
                                        "resumes, somewhat slower", "devices")
    recipe: Optional[str] = option(
        None, "fill every option from one row of the paper's tables (--list-recipes); "
              "explicit flags override it. Default: the row matching --dataset, --model, "
              "--feat-mult, --cutout and the method, if any; 'none' for the plain defaults",
        "the paper's recipes", metavar="NAME", hparam=True)

    def __post_init__(self):
        _check_fields(self, RunConfig)
        self.lr_decay_milestones = tuple(int(m) for m in self.lr_decay_milestones)
        self.plugins = tuple(self.plugins)
        if self.pipeline and self.placement != "layerwise":
            raise ValueError("pipeline needs placement='layerwise'")
        if self.classes_per_batch_until_epoch < 0:
            raise ValueError(f"classes_per_batch_until_epoch must be >= 0, "
                             f"got {self.classes_per_batch_until_epoch}")
        _check_positive("batch_size", self.batch_size)
        _check_positive("epochs", self.epochs)
        _check_positive("lr", self.lr)
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
        for name in ("lr", "weight_decay", "momentum", "lr_decay_fact"):
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

    @property
    def resolved_steps_per_execution(self) -> int:
        """``steps_per_execution``, with 0 (auto) resolved."""
        if self.steps_per_execution:
            return self.steps_per_execution
        return PIPELINE_STEPS_PER_EXECUTION if self.pipeline else 1

    def run_dict(self) -> dict:
        """The options that describe a run (data, schedule, outputs, devices)."""
        return {name: _plain(getattr(self, name)) for name in RUN_FIELDS}


@dataclasses.dataclass
class Config(RunConfig, NetworkConfig):
    """All options of a keras-local run, read flat (``config.model``, ``config.epochs``):
    its network part (``NETWORK_FIELDS``, ``network_dict()``, ``network()``) and its run
    part (``RUN_FIELDS``, ``run_dict()``).

    Field names follow the reference script's flags (``--lr-decay-milestones`` is
    ``lr_decay_milestones``).
    """

    def __post_init__(self):
        NetworkConfig.__post_init__(self)
        RunConfig.__post_init__(self)

    def network(self) -> NetworkConfig:
        """The network part: what a model saved from this run carries."""
        return NetworkConfig(**{name: getattr(self, name) for name in NETWORK_FIELDS})


NETWORK_FIELDS = tuple(f.name for f in dataclasses.fields(NetworkConfig))
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
# The options that define an experiment (``option(hparam=True)``): TensorBoard's HParams.
HPARAM_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("hparam"))


def network_part(values: dict) -> NetworkConfig:
    """The NetworkConfig of a model file's config dict. Files written before the network
    and run parts were split hold run options too: they are left out (a model does not
    use them); keys of neither part are refused."""
    return NetworkConfig.from_dict({key: value for key, value in values.items()
                                    if key not in RUN_FIELDS})


def _plain(value):
    """A field's value as JSON has it (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def _check_fields(config, part):
    """Whole numbers where a field counts something (a config file may hold anything), and
    a choice where a field has fixed ones; ``part`` is the class whose fields are checked."""
    for field in dataclasses.fields(part):
        value = getattr(config, field.name)
        if field.type in ("int", "Optional[int]") and value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise ValueError(f"{field.name} must be a whole number, got {value!r}")
        # Registry names (model, dataset) are checked where they are used, after plugins.
        choices = field.metadata.get("choices")
        if choices is not None and (not callable(choices) or field.name == "loss_sup"):
            _check_choice(field.name, value, choices_of(field))


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
