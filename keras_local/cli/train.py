"""Train a network with local error signals: the command line over keras_local.training
(``train.py`` in the repository, the console script ``keras-local-train``).

Example:  python train.py --dataset cifar10 --model vgg11b
"""

import argparse
import errno
import os
import sys

from keras_local.json_files import read_json_file


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def pre_parse(argv):
    """The options needed before Keras is imported: the backend, --resume, plugins and
    --deterministic (which keeps oneDNN's kernels off, see keras_local.quiet)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--backend", default="tensorflow")
    p.add_argument("--resume", default=None)
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("--deterministic", action="store_true")
    known, _ = p.parse_known_args(argv)
    return known


def make_parser():
    """The command line; the names offered come from the registries (models, datasets, local
    losses), including what plugins registered. Starts no Keras backend."""
    from keras_local.data.catalogue import list_datasets
    from keras_local.local_losses import list_local_losses
    from keras_local.models.registry import list_models

    datasets, models, losses = list_datasets(), list_models(), list_local_losses()
    p = OneLineParser(
        prog="train.py",
        description="Train deep networks with local error signals (Nøkland & Eidnes 2019): "
                    "every hidden layer learns from its own pred/sim loss, no global backprop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=datasets, metavar="NAME",
                      help=f"one of {', '.join(datasets)}")
    data.add_argument("--data-dir", default=None,
                      help="offline distribution files (MNIST-family IDX .gz, CIFAR python "
                           "batches), a tensorflow-datasets data dir, or for --dataset "
                           "folder/imagenet DIR/train/<class>/*.jpg|png and DIR/val/ (or test/)")
    data.add_argument("--image-size", type=int, default=None,
                      help="image folders: side of the square inputs (default 32 for folder, "
                           "224 for imagenet; above 64: random resized crop / resize + centre "
                           "crop)")
    data.add_argument("--data-mean", type=float, nargs="+", default=(), metavar="M",
                      help="image folders: per-channel mean in [0, 1] (default: computed "
                           "from the training images)")
    data.add_argument("--data-std", type=float, nargs="+", default=(), metavar="S",
                      help="image folders: per-channel std (default: computed)")
    data.add_argument("--max-train-examples", type=int, default=None,
                      help="use only the first N training images (quick runs)")
    data.add_argument("--cutout", action="store_true", help="cutout augmentation")
    data.add_argument("--length", type=int, default=16, help="cutout square side")
    data.add_argument("--classes-per-batch", type=int, default=0,
                      help="batches with only N distinct classes (0 = ordinary shuffling)")
    data.add_argument("--classes-per-batch-until-epoch", type=int, default=0,
                      help="limit the classes per batch until this epoch (0: until the end)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="vgg8b", choices=models, metavar="NAME",
                       help=f"one of {', '.join(models)}")
    model.add_argument("--num-layers", type=int, default=1,
                       help="fully connected local blocks (after the convs for vgg*)")
    model.add_argument("--num-hidden", type=int, default=1024, help="units per FC block")
    model.add_argument("--feat-mult", type=float, default=1.0, help="VGG / ResNet channel multiplier")
    model.add_argument("--pre-act", action="store_true",
                       help="ResNets: pre-activation basic blocks (BN -> act -> conv)")
    model.add_argument("--no-batch-norm", action="store_true", help="no BatchNorm")
    model.add_argument("--nonlin", default="relu", choices=("relu", "leakyrelu"))
    model.add_argument("--dropout", type=float, default=0.0,
                       help="dropout after each block (spatial for conv blocks)")
    model.add_argument("--dim-in-decoder", type=int, default=4096,
                       help="max input size of the pred head after average pooling")
    local = p.add_argument_group("local learning")
    local.add_argument("--loss-sup", default="predsim", choices=losses, metavar="NAME",
                       help=f"local loss, one of {', '.join(losses)}")
    local.add_argument("--modules", type=int, default=None, metavar="K",
                       help="group the local layers into K modules of consecutive layers, "
                            "heads on each module's last layer (default: every layer its own "
                            "module; 1 = end-to-end with one auxiliary head)")
    local.add_argument("--beta", type=float, default=0.99, help="predsim weight of sim")
    local.add_argument("--backprop", action="store_true",
                       help="baseline: global backprop, no local heads")
    local.add_argument("--no-detach", action="store_true",
                       help="local losses, but gradients also cross blocks")
    local.add_argument("--bio", action="store_true",
                       help="back-prop free: feedback alignment, no sim conv, random label "
                            "projection")
    local.add_argument("--target-proj-size", type=int, default=128,
                       help="size of the random label projection (--bio)")
    local.add_argument("--loss-unsup", default="none", choices=("none", "sim", "recon"),
                       help="unsupervised local term: sim = MSE(S(h), S(block input)), "
                            "recon = reconstruction of the block input")
    local.add_argument("--alpha", type=float, default=0.0,
                       help="block loss = alpha * unsupervised + (1 - alpha) * supervised")
    local.add_argument("--no-similarity-std", action="store_true",
                       help="similarity of feature maps on the flattened maps, not on the "
                            "per-channel spatial std")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=128)
    optim.add_argument("--epochs", type=int, default=400)
    optim.add_argument("--lr", type=float, default=5e-4)
    optim.add_argument("--lr-decay-milestones", type=int, nargs="+",
                       default=[200, 300, 350, 375], help="epochs at which lr is decayed")
    optim.add_argument("--lr-decay-fact", type=float, default=0.25)
    optim.add_argument("--optim", default="adam", choices=("adam", "amsgrad", "sgd", "keras_adam"),
                       help="PyTorch's Adam / AMSGrad / SGD (as the reference); keras_adam: "
                            "Keras's Adam (epsilon before bias correction)")
    optim.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    run = p.add_argument_group("run")
    run.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                     help="import MODULE (dotted name or .py file) first: the local losses, "
                          "models and datasets it registers become choices (repeatable)")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--save-dir", default="runs", help="parent of the run directories")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue a run from its last completed epoch")
    run.add_argument("--backend", default="tensorflow", choices=("tensorflow", "jax", "torch"),
                     help="Keras backend")
    run.add_argument("--no-jit", action="store_true", help="do not compile with XLA")
    run.add_argument("--precision", default="float32",
                     choices=("float32", "mixed_float16", "mixed_bfloat16"))
    run.add_argument("--strategy", default="auto",
                     choices=("auto", "one", "mirrored", "multiworker"),
                     help="tf.distribute strategy (auto: mirrored on >1 GPU, multiworker "
                          "when TF_CONFIG names several workers)")
    run.add_argument("--placement", default="none", choices=("none", "layerwise"),
                     help="layerwise: block i on device i mod N")
    run.add_argument("--pipeline", action="store_true",
                     help="decoupled pipelined training (needs --placement layerwise)")
    run.add_argument("--steps-per-execution", type=int, default=0, metavar="N",
                     help="training steps per call of the compiled train function "
                          "(0 = auto: 16 when pipelined, else 1)")
    run.add_argument("--no-export", action="store_true",
                     help="skip the SavedModel/ONNX export at the end")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic TensorFlow kernels (enable_op_determinism): "
                          "bit-identical reruns and resumes, somewhat slower")
    run.add_argument("--similarity-examples", type=int, default=64, metavar="N",
                     help="test images whose similarity matrix TensorBoard shows for every "
                          "block after each epoch (0 = none)")
    recipes = p.add_argument_group("the paper's recipes")
    recipes.add_argument("--recipe", default=None, metavar="NAME",
                         help="fill every option from one row of the paper's tables "
                              "(--list-recipes); explicit flags override it. Default: the "
                              "row matching --dataset, --model, --feat-mult, --cutout and the "
                              "method, if any; 'none' for the plain defaults")
    recipes.add_argument("--list-recipes", action="store_true",
                         help="print the recipes with their published test error and exit")
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
    early = pre_parse(argv)
    resumed = resumed_options(early.resume)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = resumed.get("backend") or early.backend  # before Keras
    if early.deterministic or resumed.get("deterministic"):
        # Before TensorFlow starts: oneDNN's kernels are not covered by op determinism.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from keras_local.plugins import PluginError, load_plugins
    from keras_local.quiet import quiet_start

    plugins = list(resumed.get("plugins", [])) + early.plugin
    if plugins:
        quiet_start(import_tensorflow=True)  # a plugin may import Keras
    try:
        load_plugins(plugins)
    except PluginError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    args = parse_args(argv)  # --help and bad flags end here, before TensorFlow starts
    quiet_start(import_tensorflow=True)  # no C++ start-up noise; tf.data on every backend
    if args.list_recipes:
        from keras_local.recipes import format_recipes

        print(format_recipes())
        return 0
    from keras_local.callbacks import NonFiniteLossError
    from keras_local.cli_errors import USER_ERRORS
    from keras_local.config import Config
    from keras_local.json_files import WriteError
    from keras_local.resume import ResumeError
    from keras_local.training import RunFinished, RunInUseError, prepare, train_prepared

    try:
        values, note = recipe_config_values(args, argv)
        if note:
            print(note)
        prepared = prepare(Config(**values))
    except RunFinished as finished:
        print(f"train.py: {finished}")
        return 0
    except (*USER_ERRORS, WriteError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    try:
        train_prepared(prepared, verbose=0 if args.quiet else 1, export=not args.no_export)
    except NonFiniteLossError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    except RunFinished as finished:  # by another process while this one prepared
        print(f"train.py: {finished}")
        return 0
    except (ResumeError, RunInUseError) as error:  # refused before writing anything
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full or read-only while saving: the last epoch is kept
        if not isinstance(error, WriteError) and error.errno not in DISK_ERRORS:
            raise
        print(f"train.py: error: {error}; the files of the last completed epoch are "
              f"intact (continue with --resume RUN_DIR once there is room)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; continue with --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
