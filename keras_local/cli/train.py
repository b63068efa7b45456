"""Train a network with local error signals: the command line over keras_local.run.training,
installed as the console script ``keras-local-train`` (``train.py`` in the repository).

Example:  keras-local-train --dataset cifar10 --model vgg11b

Every default shown by ``--help`` is ``Config``'s field default, read from the dataclass.
"""

import argparse
import dataclasses
import errno
import os
import sys

from keras_local.cli import TRAIN_COMMAND, OneLineParser
from keras_local.config import (BACKEND_CHOICES, LOSS_UNSUP_CHOICES, NONLIN_CHOICES,
                                OPTIM_CHOICES, PLACEMENT_CHOICES, PRECISION_CHOICES,
                                STRATEGY_CHOICES, Config)
from keras_local.run.json_files import read_json_file


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
DEFAULTS = {field.name: field.default for field in dataclasses.fields(Config)}
DEMO_COMMAND = f"{TRAIN_COMMAND} --dataset fashion_mnist_demo --model mlp --epochs 3"
# One line for a bare command: its defaults (cifar10) would start a download.
NO_OPTIONS = (f"{TRAIN_COMMAND}: error: no options given; the defaults (--dataset "
              f"{DEFAULTS['dataset']} --model {DEFAULTS['model']}, {DEFAULTS['epochs']} epochs) "
              f"download {DEFAULTS['dataset']}: give them explicitly to train them; --help "
              f"lists every option. Offline demo: {DEMO_COMMAND}")


def pre_parse(argv):
    """The options needed before Keras is imported: the backend, --resume, plugins and
    --deterministic (which keeps oneDNN's kernels off, see keras_local.run.quiet)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--backend", default=DEFAULTS["backend"])
    p.add_argument("--resume", default=None)
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("--deterministic", action="store_true")
    known, _ = p.parse_known_args(argv)
    return known


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


class _Options:
    """Adds options to a group of the parser. An option named after a Config field takes
    that field's default, and its help ends with the default as it will run and, for the
    fields a recipe sets, that a recipe may replace it."""

    def __init__(self, group, recipe_fields):
        self.group, self.recipe_fields = group, recipe_fields

    def __call__(self, flag, help, field=None, **kwargs):
        field = field or flag[2:].replace("-", "_")
        recipe = "recipes set it" if field in self.recipe_fields else ""
        if kwargs.get("action") == "store_true":  # off unless given
            help += f" ({recipe})" if recipe else ""
        elif field in DEFAULTS:
            default = DEFAULTS[field]
            kwargs["default"] = list(default) if isinstance(default, tuple) else default
            if default not in (None, ()):  # the help says what "not given" means
                help += f" (default: {_shown(default)}" + (f"; {recipe})" if recipe else ")")
        self.group.add_argument(flag, help=help.replace("%", "%%"), **kwargs)


def make_parser():
    """The command line; the names offered come from the registries (models, datasets, local
    losses), including what plugins registered, and the defaults from Config. Starts no
    Keras backend."""
    from keras_local.data.catalogue import list_datasets
    from keras_local.losses.registry import list_local_losses
    from keras_local.models.registry import list_models
    from keras_local.recipes import RECIPES

    datasets, models, losses = list_datasets(), list_models(), list_local_losses()
    recipe_fields = {field for recipe in RECIPES.values() for field in recipe.options}
    p = OneLineParser(
        prog=TRAIN_COMMAND,
        description="Train deep networks with local error signals (Nøkland & Eidnes 2019): "
                    "every hidden layer learns from its own pred/sim loss, no global "
                    "backprop. Defaults are shown as they run without a recipe. When "
                    "--dataset, --model, --feat-mult, --cutout and the method match a row "
                    "of the paper's tables (--list-recipes), that recipe replaces the "
                    "defaults marked 'recipes set it' except where you give the flag, and "
                    "the run says so when it starts; --recipe none keeps these defaults.")
    data = _Options(p.add_argument_group("data"), recipe_fields)
    data("--dataset", f"one of {', '.join(datasets)}", choices=datasets, metavar="NAME")
    data("--data-dir", "offline distribution files (MNIST-family IDX .gz, CIFAR python "
                       "batches), a tensorflow-datasets data dir, or for --dataset "
                       "folder/imagenet DIR/train/<class>/*.jpg|png and DIR/val/ (or test/)")
    data("--image-size", "image folders: side of the square inputs (default 32 for folder, "
                         "224 for imagenet; above 64: random resized crop / resize + centre "
                         "crop)", type=int)
    data("--data-mean", "image folders: per-channel mean in [0, 1] (default: computed from "
                        "the training images)", type=float, nargs="+", metavar="M")
    data("--data-std", "image folders: per-channel std (default: computed)", type=float,
         nargs="+", metavar="S")
    data("--max-train-examples", "use only the first N training images (quick runs; "
                                 "default: all)", type=int)
    data("--cutout", "cutout augmentation", action="store_true")
    data("--length", "cutout square side", type=int)
    data("--classes-per-batch", "batches with only N distinct classes (0 = ordinary "
                                "shuffling)", type=int)
    data("--classes-per-batch-until-epoch", "limit the classes per batch until this epoch "
                                            "(0: until the end)", type=int)
    model = _Options(p.add_argument_group("model"), recipe_fields)
    model("--model", f"one of {', '.join(models)}", choices=models, metavar="NAME")
    model("--num-layers", "fully connected local blocks (after the convs for vgg*)", type=int)
    model("--num-hidden", "units per FC block", type=int)
    model("--feat-mult", "VGG / ResNet channel multiplier", type=float)
    model("--pre-act", "ResNets: pre-activation basic blocks (BN -> act -> conv)",
          action="store_true")
    model("--no-batch-norm", "no BatchNorm", field="batch_norm", action="store_true")
    model("--nonlin", "activation", choices=NONLIN_CHOICES)
    model("--dropout", "dropout after each block (spatial for conv blocks)", type=float)
    model("--dim-in-decoder", "max input size of the pred head after average pooling",
          type=int)
    local = _Options(p.add_argument_group("local learning"), recipe_fields)
    local("--loss-sup", f"local loss, one of {', '.join(losses)}", choices=losses,
          metavar="NAME")
    local("--modules", "group the local layers into K modules of consecutive layers, heads "
                       "on each module's last layer (default: every layer its own module; "
                       "1 = end-to-end with one auxiliary head)", type=int, metavar="K")
    local("--beta", "predsim weight of sim", type=float)
    local("--backprop", "baseline: global backprop, no local heads", action="store_true")
    local("--no-detach", "local losses, but gradients also cross blocks", action="store_true")
    local("--bio", "back-prop free: feedback alignment, no sim conv, random label projection",
          action="store_true")
    local("--target-proj-size", "size of the random label projection (--bio)", type=int)
    local("--loss-unsup", "unsupervised local term: sim = MSE(S(h), S(block input)), recon = "
                          "reconstruction of the block input", choices=LOSS_UNSUP_CHOICES)
    local("--alpha", "block loss = alpha * unsupervised + (1 - alpha) * supervised",
          type=float)
    local("--no-similarity-std", "similarity of feature maps on the flattened maps, not on "
                                 "the per-channel spatial std", field="similarity_std",
          action="store_true")
    optim = _Options(p.add_argument_group("optimisation"), recipe_fields)
    optim("--batch-size", "examples per training batch", type=int)
    optim("--epochs", "training epochs", type=int)
    optim("--lr", "initial learning rate", type=float)
    optim("--lr-decay-milestones", "epochs at which lr is decayed", type=int, nargs="+")
    optim("--lr-decay-fact", "factor of each lr decay", type=float)
    optim("--optim", "PyTorch's Adam / AMSGrad / SGD (as the reference); keras_adam: Keras's "
                     "Adam (epsilon before bias correction)", choices=OPTIM_CHOICES)
    optim("--momentum", "SGD momentum", type=float)
    optim("--weight-decay", "L2 weight decay", type=float)
    run = _Options(p.add_argument_group("run"), recipe_fields)
    run("--plugin", "import MODULE (dotted name or .py file) first: the local losses, models "
                    "and datasets it registers become choices (repeatable)", field="plugins",
        action="append", metavar="MODULE")
    run("--seed", "random seed of weights, data order and dropout", type=int)
    run("--save-dir", "parent of the run directories")
    run("--resume", "continue a run from its last completed epoch", metavar="RUN_DIR")
    run("--backend", "Keras backend", choices=BACKEND_CHOICES)
    run("--no-jit", "do not compile with XLA", field="jit_compile", action="store_true")
    run("--precision", "float32 or a mixed-precision policy", choices=PRECISION_CHOICES)
    run("--strategy", "tf.distribute strategy (auto: mirrored on >1 GPU, multiworker when "
                      "TF_CONFIG names several workers)", choices=STRATEGY_CHOICES)
    run("--placement", "layerwise: block i on device i mod N", choices=PLACEMENT_CHOICES)
    run("--pipeline", "decoupled pipelined training (needs --placement layerwise)",
        action="store_true")
    run("--steps-per-execution", "training steps per call of the compiled train function "
                                 "(0 = auto: 16 when pipelined, else 1)", type=int,
        metavar="N")
    run("--no-export", "skip the SavedModel/ONNX export at the end", action="store_true")
    run("--quiet", "no progress bar", action="store_true")
    run("--deterministic", "deterministic TensorFlow kernels (enable_op_determinism): "
                           "bit-identical reruns and resumes, somewhat slower",
        action="store_true")
    run("--similarity-examples", "test images whose similarity matrix TensorBoard shows for "
                                 "every block after each epoch (0 = none)", type=int,
        metavar="N")
    recipes = _Options(p.add_argument_group("the paper's recipes"), recipe_fields)
    recipes("--recipe", "fill every option from one row of the paper's tables "
                        "(--list-recipes); explicit flags override it. Default: the row "
                        "matching --dataset, --model, --feat-mult, --cutout and the method, "
                        "if any; 'none' for the plain defaults", metavar="NAME")
    recipes("--list-recipes", "print the recipes with their published test error and exit",
            action="store_true")
    return p


def parse_args(argv):
    return make_parser().parse_args(argv)


def explicit_options(argv):
    """The options (destination names) given on the command line, whatever their values."""
    parser = make_parser()
    unset = object()
    # argparse fills in a default only where the namespace lacks the attribute. --plugin
    # appends to its value, so it keeps its list (recipes never set plugins).
    dests = [dest for dest in vars(parser.parse_args(argv)) if dest != "plugin"]
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {dest for dest, value in vars(given).items() if value is not unset}


def config_values(args):
    values = {key: value for key, value in vars(args).items()
              if key not in ("no_batch_norm", "no_jit", "no_export", "quiet", "plugin",
                             "no_similarity_std", "list_recipes")}
    values["plugins"] = tuple(args.plugin)
    values["batch_norm"] = not args.no_batch_norm
    values["similarity_std"] = not args.no_similarity_std
    values["jit_compile"] = not args.no_jit
    values["lr_decay_milestones"] = tuple(args.lr_decay_milestones)
    if values["recipe"] == "none":
        values["recipe"] = None
    return values


def recipe_config_values(args, argv):
    """Config values of the run: the recipe's options (named, or the one matching the
    run) under the explicit flags; and the one-line note saying which recipe, if any.
    A resumed run keeps its stored options, so no recipe applies."""
    from keras_local.recipes import apply_recipe

    values = config_values(args)
    if args.resume:
        return values, None
    return apply_recipe(values, explicit_options(argv), args.recipe)


def resumed_options(run_dir):
    """The stored config of a run being resumed (read before Keras is imported); {} when
    there is none (keras_local reports the unreadable run directory)."""
    path = os.path.join(run_dir or "", "config.json")
    if not run_dir or not os.path.isfile(path):
        return {}
    try:
        stored = read_json_file(path)
    except ValueError:  # size, depth, syntax: keras_local reports it in one line
        return {}
    return stored if isinstance(stored, dict) else {}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(NO_OPTIONS, file=sys.stderr)
        return 2
    early = pre_parse(argv)
    resumed = resumed_options(early.resume)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = resumed.get("backend") or early.backend  # before Keras
    if early.deterministic or resumed.get("deterministic"):
        # Before TensorFlow starts: oneDNN's kernels are not covered by op determinism.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from keras_local.run.plugins import PluginError, load_plugins
    from keras_local.run.quiet import quiet_start

    plugins = list(resumed.get("plugins", [])) + early.plugin
    if plugins:
        quiet_start(import_tensorflow=True)  # a plugin may import Keras
    try:
        load_plugins(plugins)
    except PluginError as error:
        print(f"{TRAIN_COMMAND}: error: {error}", file=sys.stderr)
        return 2
    args = parse_args(argv)  # --help and bad flags end here, before any backend starts
    if args.list_recipes:
        from keras_local.recipes import format_recipes

        print(format_recipes())
        return 0
    quiet_start(import_tensorflow=True)  # no C++ start-up noise; tf.data on every backend
    from keras_local.run.callbacks import NonFiniteLossError
    from keras_local.cli.errors import USER_ERRORS
    from keras_local.run.json_files import WriteError
    from keras_local.run.resume import ResumeError
    from keras_local.run.training import RunFinished, RunInUseError, prepare, train_prepared

    try:
        values, note = recipe_config_values(args, argv)
        if note:
            print(note)
        prepared = prepare(Config(**values))
    except RunFinished as finished:
        print(f"{TRAIN_COMMAND}: {finished}")
        return 0
    except (*USER_ERRORS, WriteError) as error:
        print(f"{TRAIN_COMMAND}: error: {error}", file=sys.stderr)
        return 2
    try:
        train_prepared(prepared, verbose=0 if args.quiet else 1, export=not args.no_export)
    except NonFiniteLossError as error:
        print(f"{TRAIN_COMMAND}: error: {error}", file=sys.stderr)
        return 1
    except RunFinished as finished:  # by another process while this one prepared
        print(f"{TRAIN_COMMAND}: {finished}")
        return 0
    except (ResumeError, RunInUseError) as error:  # refused before writing anything
        print(f"{TRAIN_COMMAND}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full or read-only while saving: the last epoch is kept
        if not isinstance(error, WriteError) and error.errno not in DISK_ERRORS:
            raise
        print(f"{TRAIN_COMMAND}: error: {error}; the files of the last completed epoch are "
              f"intact (continue with --resume RUN_DIR once there is room)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{TRAIN_COMMAND}: interrupted; continue with --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
