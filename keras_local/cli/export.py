"""keras-local-export RUN_DIR_OR_CHECKPOINT [--format savedmodel onnx] [--out DIR] [--overwrite]

A run directory holds ``config.json``, ``model.keras`` (or ``checkpoints/last.keras``) and
optionally ``results.json`` with ``{"test_error": ...}``; a checkpoint is a ``.keras`` file
of a LocalModel. Bad input (not a run or checkpoint, unreadable file): one line on stderr,
exit code 2, nothing written. A failed export (e.g. parity check): exit code 1.
"""

import pathlib
import sys
import zipfile

from keras_local.cli import EXIT_BAD_INPUT, EXPORT_COMMAND, OneLineParser
from keras_local.run.quiet import quiet_start

quiet_start()  # before Keras imports TensorFlow: no C++ start-up noise
import keras  # noqa: E402

from keras_local.exporting import (FORMATS, ExportError, NotReplaceableError, check_replaceable,
                                   export_model)
from keras_local.run.json_files import JSONFileError, read_json_file
from keras_local.run.model_files import ModelFileError, check_keras_file
from keras_local.models.local_model import LocalModel, load_model

EXIT_EXPORT_FAILED = 1


class BadInput(Exception):
    """The given path is not a usable run directory or checkpoint."""


def parse_args(argv):
    parser = OneLineParser(
        prog=EXPORT_COMMAND,
        description="Export a trained keras-local model (heads stripped) as SavedModel/ONNX.")
    parser.add_argument("source", help="run directory or .keras checkpoint")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS),
                        dest="formats", help="formats to write (default: both)")
    parser.add_argument("--out", help="export directory (default: saved_models/<run name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing export directory")
    return parser.parse_args(argv)


def resolve_source(path):
    """(model file, run config dict or None, test error or None, export name) for a path."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".keras":
        return path, None, None, path.stem
    if not path.is_dir():
        raise BadInput(f"{path} is neither a run directory nor a .keras checkpoint")
    if not (path / "config.json").is_file():
        raise BadInput(f"{path} is not a run directory: no config.json")
    model_file = next((candidate for candidate in
                       (path / "model.keras", path / "checkpoints" / "last.keras")
                       if candidate.is_file()), None)
    if model_file is None:
        raise BadInput(f"{path}: no model.keras or checkpoints/last.keras")
    run_config = _read_json_object(path / "config.json")
    test_error = None
    if (path / "results.json").is_file():
        test_error = _read_json_object(path / "results.json").get("test_error")
        if test_error is not None and not isinstance(test_error, (int, float)):
            raise BadInput(f"{path / 'results.json'}: test_error {test_error!r} is not a number")
    return model_file, run_config, test_error, path.resolve().name


def check_no_overlap(source, model_file, out_dir):
    """An export never replaces its inputs: ``out_dir`` may not be the source, hold it,
    or be the model file's folder."""
    out_dir = out_dir.resolve()
    for path in (pathlib.Path(source).resolve(), pathlib.Path(model_file).resolve()):
        if out_dir == path or out_dir in path.parents:
            raise BadInput(f"--out {out_dir} would replace the export's own input {path}: "
                           f"choose a directory outside it")


def _read_json_object(path):
    try:
        values = read_json_file(path)
    except JSONFileError as error:
        raise BadInput(str(error)) from None
    if not isinstance(values, dict):
        raise BadInput(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def load_local_model(model_file):
    """Load a LocalModel from a .keras file (safe_mode stays on), after bounding what its
    config would build (``keras_local.run.model_files``)."""
    if not zipfile.is_zipfile(model_file):
        raise BadInput(f"{model_file} is not a .keras model file (not a zip archive)")
    try:
        check_keras_file(model_file)
    except ModelFileError as error:
        raise BadInput(str(error)) from None
    try:
        model = load_model(model_file, compile=False)
    except Exception as error:  # untrusted file: any failure to parse is bad input
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else \
            type(error).__name__
        raise BadInput(f"cannot load a model from {model_file}: {reason}") from None
    if not isinstance(model, LocalModel):
        raise BadInput(f"{model_file} holds a {type(model).__name__}, not a keras-local "
                       "LocalModel")
    return model


def main(argv=None):
    args = parse_args(argv)
    try:
        model_file, run_config, test_error, name = resolve_source(args.source)
        out_dir = pathlib.Path(args.out) if args.out else pathlib.Path("saved_models") / name
        check_no_overlap(args.source, model_file, out_dir)
        if out_dir.exists() and not args.overwrite:
            raise BadInput(f"{out_dir} already exists (pass --overwrite to replace it)")
        if out_dir.exists():
            try:
                check_replaceable(out_dir)
            except ExportError as error:
                raise BadInput(str(error)) from None
        model = load_local_model(model_file)
    except BadInput as error:
        print(f"{EXPORT_COMMAND}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        metadata = export_model(model, out_dir, formats=args.formats, test_error=test_error,
                                run_config=run_config, overwrite=args.overwrite)
    except NotReplaceableError as error:  # files appeared in --out while exporting
        print(f"{EXPORT_COMMAND}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # an unwritable or full destination: the user's to fix
        print(f"{EXPORT_COMMAND}: error: cannot write the export to {out_dir}: "
              f"{error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ExportError, RuntimeError, ValueError) as error:  # parity, backend, dataset
        print(f"{EXPORT_COMMAND}: error: export failed: {error}", file=sys.stderr)
        return EXIT_EXPORT_FAILED
    diffs = ", ".join(f"{fmt} {diff:.1e}" for fmt, diff in metadata["parity_max_abs_diff"].items())
    print(f"exported {metadata['architecture']} ({metadata['parameter_count']:,} parameters, "
          f"heads stripped) to {out_dir}; max |logit diff| vs Keras: {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
