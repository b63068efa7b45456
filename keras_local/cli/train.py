"""Train a network with local error signals: the command line over keras_local.run.training,
installed as the console script ``keras-local-train`` (``train.py`` in the repository).

Example:  keras-local-train --dataset cifar10 --model vgg11b

The options are generated from ``Config``'s fields (``keras_local.config.option``): a
field added there is an option here, with its help, group, choices and default.
"""

import argparse
import contextlib
import dataclasses
import errno
import os
import sys
import types
import typing

from keras_local.cli import TRAIN_COMMAND, OneLineParser
from keras_local.config import GROUPS, Config, choices_of
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
    """The options needed before Keras is imported: the backend, --resume, plugins,
    --deterministic (which keeps oneDNN's kernels off) and --xla-cache (see
    keras_local.run.quiet). Their
    values are checked later, by the whole parser, once plugins have registered names."""
    p = argparse.ArgumentParser(add_help=False)
    fields = {field.name: field for field in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    for name in ("backend", "resume", "plugins", "deterministic", "xla_cache"):
        kwargs = _argument(fields[name], hints[name])
        kwargs.pop("choices", None)
        p.add_argument(option_flag(fields[name]), **kwargs)
    known, _ = p.parse_known_args(argv)
    return known


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def field_default(field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def option_flag(field):
    """The command-line flag of a Config field: its dashed name, ``--no-NAME`` for a bool
    that defaults to True, or the ``flag`` its declaration names."""
    if field.metadata.get("flag"):
        return field.metadata["flag"]
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field_default(field) is True else f"--{name}"


def command_line_fields(config_class=Config):
    """The fields of ``config_class`` that are command-line options (all but those
    declared ``cli=False``), in the order of their ``--help`` groups."""
    fields = [field for field in dataclasses.fields(config_class)
              if field.metadata.get("cli", True)]
    order = {name: index for index, name in enumerate(GROUPS)}
    return sorted(fields, key=lambda field: order.get(field.metadata.get("group"), len(order)))


def _argument(field, hint):
    """argparse keyword arguments for a field annotated ``hint``, except its help."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        values = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = values[0] if len(values) == 1 else hint  # Optional[T]: T or not given
    kwargs = {"dest": field.name, "default": field_default(field)}
    if hint is bool:
        kwargs["action"] = "store_false" if kwargs["default"] else "store_true"
    elif typing.get_origin(hint) is tuple and typing.get_args(hint)[-1:] == (...,):
        kwargs.update(type=typing.get_args(hint)[0], default=list(kwargs["default"]))
        if field.metadata.get("repeat"):
            kwargs["action"] = "append"
        else:
            kwargs["nargs"] = "+"
    elif hint in (int, float, str):
        kwargs["type"] = hint
    else:
        raise TypeError(f"Config field {field.name}: no command-line form for {hint!r} "
                        f"(use bool, int, float, str, Optional[...] or tuple[T, ...])")
    choices = choices_of(field)
    if choices is not None:
        kwargs["choices"] = list(choices)
    if field.metadata.get("metavar"):
        kwargs["metavar"] = field.metadata["metavar"]
    return kwargs


def _help(field, kwargs, recipe_fields):
    """The field's help, ending with its default as it will run and, for the fields a
    recipe sets, that a recipe may replace it."""
    text = field.metadata.get("help", "")
    if "choices" in kwargs:
        text = text.replace("{choices}", ", ".join(kwargs["choices"]))
    recipe = "recipes set it" if field.name in recipe_fields else ""
    default = field_default(field)
    if kwargs.get("action") in ("store_true", "store_false"):  # a switch: off unless given
        text += f" ({recipe})" if recipe else ""
    elif default not in (None, (), []):  # else the help says what "not given" means
        text += f" (default: {_shown(default)}" + (f"; {recipe})" if recipe else ")")
    return text.replace("%", "%%")


def make_parser(config_class=Config):
    """The command line, generated from the fields of ``config_class`` (their help, group,
    default and choices; ``keras_local.config.option``) plus the options that are not
    Config fields. The names offered come from the registries (models, datasets, local
    losses), including what plugins registered. Starts no Keras backend."""
    from keras_local.recipes import RECIPES

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
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    hints = typing.get_type_hints(config_class)
    for field in command_line_fields(config_class):
        group = field.metadata.get("group", "other options")
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        kwargs = _argument(field, hints[field.name])
        groups[group].add_argument(option_flag(field), help=_help(field, kwargs, recipe_fields),
                                   **kwargs)
    # What only this command does with a run: not options of the run itself.
    groups["run"].add_argument("--no-export", action="store_true",
                               help="skip the SavedModel/ONNX export at the end")
    groups["run"].add_argument("--quiet", action="store_true", help="no progress bar")
    groups["the paper's recipes"].add_argument(
        "--list-recipes", action="store_true",
        help="print the recipes with their published test error and exit")
    return p


def parse_args(argv, config_class=Config):
    return make_parser(config_class).parse_args(argv)


def explicit_options(argv, config_class=Config):
    """The options (destination names) given on the command line, whatever their values."""
    parser = make_parser(config_class)
    unset = object()
    # argparse fills in a default only where the namespace lacks the attribute. A repeated
    # option (--plugin) appends to its value, so it keeps its empty list: given if filled.
    repeated = {field.name for field in command_line_fields(config_class)
                if field.metadata.get("repeat")}
    dests = [dest for dest in vars(parser.parse_args(argv)) if dest not in repeated]
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {dest for dest, value in vars(given).items()
            if value is not unset and (dest not in repeated or value)}


def config_values(args, config_class=Config):
    """The Config fields of parsed ``args`` (sequences as tuples)."""
    names = {field.name for field in dataclasses.fields(config_class)}
    values = {key: tuple(value) if isinstance(value, list) else value
              for key, value in vars(args).items() if key in names}
    if values.get("recipe") == "none":
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
    from keras_local.run.quiet import (XLA_CACHE_NOISE, live_filtered_stderr, quiet_start,
                                       use_xla_cache)

    xla_cache = use_xla_cache(resumed.get("xla_cache", early.xla_cache))

    plugins = list(resumed.get("plugins", [])) + early.plugins
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
    cache_noise_filter = (live_filtered_stderr(XLA_CACHE_NOISE) if xla_cache
                          else contextlib.nullcontext())
    try:
        with cache_noise_filter:
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
