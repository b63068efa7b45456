"""Reports of finished runs: error curves of several runs in one PNG, a table, and the
summary printed at the end of a run.

    keras-local-report RUN_DIR [RUN_DIR ...] [-o curves.png]

Reads what training writes into a run directory: ``config.json`` (the options),
``history.csv`` (one row per epoch: ``error`` on the training batches, ``val_error`` on the
test set) and ``results.json`` (final test error, wall time, images/s; absent while a run is
unfinished). Bad run directories: one line on stderr, exit code 2, nothing written.
"""

import csv
import dataclasses
import math
import os
import shlex
import sys

from keras_local.cli import (EXIT_BAD_INPUT, EXPORT_COMMAND, PREDICT_COMMAND, REPORT_COMMAND,
                             OneLineParser)
from keras_local.run.json_files import JSONFileError, read_json_file


class ReportError(ValueError):
    """A directory that is not a readable keras-local run."""


@dataclasses.dataclass
class Run:
    path: str
    config: dict
    epochs: list          # 1-based epoch numbers
    train_error: list     # % per epoch, on the (augmented, dropped-out) training batches
    test_error: list      # % per epoch, on the test set
    results: dict         # results.json, {} while the run is unfinished

    @property
    def label(self):
        mode = self.config.get("training_mode") or _training_mode(self.config)
        return f"{self.config.get('model', '?')} {mode}"

    @property
    def best_epoch(self):
        return self.epochs[min(range(len(self.test_error)), key=self.test_error.__getitem__)]

    @property
    def best_test_error(self):
        return min(self.test_error)

    @property
    def final_test_error(self):
        return self.results.get("test_error", self.test_error[-1])


def _training_mode(config):
    if config.get("backprop"):
        return "backprop"
    if config.get("no_detach"):
        return "no_detach"
    mode = config.get("loss_sup", "?")
    return mode + (" bio" if config.get("bio") else "")


def read_run(path):
    """The Run in directory ``path``; ReportError (one line) if it is not one."""
    if not os.path.isdir(path):
        raise ReportError(f"{path}: no such directory")
    config = _read_json(path, "config.json", required=True)
    results = _read_json(path, "results.json", required=False)
    history = os.path.join(path, "history.csv")
    if not os.path.isfile(history):
        raise ReportError(f"{path}: not a run directory with epochs (no history.csv)")
    try:
        with open(history, newline="") as stream:
            rows = list(csv.DictReader(stream))
        epochs = [int(row["epoch"]) + 1 for row in rows]
        train_error = [float(row["error"]) for row in rows]
        test_error = [float(row["val_error"]) for row in rows]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as error:
        raise ReportError(f"{history}: not a keras-local history "
                          f"(needs epoch, error, val_error columns: {error!r})") from None
    if not rows:
        raise ReportError(f"{history}: no completed epoch yet")
    if not all(map(math.isfinite, train_error + test_error)):
        raise ReportError(f"{history}: non-finite error values")
    return Run(path, config, epochs, train_error, test_error, results)


def _read_json(path, name, required):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        if required:
            raise ReportError(f"{path}: not a run directory (no {name})")
        return {}
    try:
        values = read_json_file(file)
    except JSONFileError as error:  # unreadable, not JSON, too large or nested too deeply
        reason = str(error).removeprefix(f"{file}: ")
        raise ReportError(f"{file}: not readable JSON ({reason})") from None
    if not isinstance(values, dict):
        raise ReportError(f"{file}: expected a JSON object, got {type(values).__name__}")
    return values


# ------------------------------------------------------------------------ table
def _number(value, spec, unit=""):
    return "-" if not isinstance(value, (int, float)) else f"{value:{spec}}{unit}"


def table(runs):
    """A plain-text table, one row per run (the column widths fit the content)."""
    header = ("run", "epochs", "final test err", "best test err", "best epoch", "wall time",
              "images/s", "directory")
    rows = [header]
    for run in runs:
        rows.append((run.label, str(len(run.epochs)), f"{run.final_test_error:.2f}%",
                     f"{run.best_test_error:.2f}%", str(run.best_epoch),
                     _number(run.results.get("wall_seconds"), ".1f", " s"),
                     _number(run.results.get("images_per_second"), ",.0f"), run.path))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


# ------------------------------------------------------------------------ picture
def draw_curves(runs, path):
    """Test (solid) and training (dashed) error of every run against the epoch, one PNG,
    written to a temporary name first and then renamed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7.5, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels = [run.label for run in runs]
    for index, run in enumerate(runs):
        label = run.label if labels.count(run.label) == 1 else \
            f"{run.label} ({os.path.basename(os.path.normpath(run.path))})"
        colour = f"C{index % 10}"
        axes.plot(run.epochs, run.test_error, "-", color=colour, marker="o", markersize=3,
                  label=f"{label}: test")
        axes.plot(run.epochs, run.train_error, "--", color=colour, label=f"{label}: train")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("error (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    datasets = sorted({str(run.config.get("dataset", "?")) for run in runs})
    axes.set_title(f"{', '.join(datasets)}: test (solid) and training (dashed) error")
    figure.tight_layout()
    temporary = f"{path}.partial"
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# ------------------------------------------------------------------ end of a run
def run_summary(path, exported):
    """The lines printed at the end of a training run: results and next steps."""
    run = read_run(path)
    quoted = shlex.quote(path)
    results = run.results
    timing = (f"{_number(results.get('wall_seconds'), '.1f', ' s')} wall time, "
              f"{_number(results.get('images_per_second'), ',.0f')} training images/s")
    lines = [
        f"done: {run.label} on {run.config.get('dataset', '?')}, {len(run.epochs)} "
        f"epoch{'' if len(run.epochs) == 1 else 's'}, "
        f"{timing}",
        f"  test error       {run.final_test_error:.2f}% (best {run.best_test_error:.2f}% "
        f"at epoch {run.best_epoch})",
        f"  run directory    {path}",
        f"  TensorBoard logs {os.path.join(path, 'logs')}",
    ]
    export_dir = os.path.join(path, "export")
    onnx = os.path.join(export_dir, "model.onnx")
    if exported and os.path.isfile(onnx):
        lines.append(f"  exported model   {export_dir}")
    else:
        lines.append(f"  exported model   none yet ({EXPORT_COMMAND}, below)")
        onnx = os.path.join("saved_models", os.path.basename(os.path.normpath(path)),
                            "model.onnx")
    lines += [
        "next:",
        f"  tensorboard --logdir {shlex.quote(os.path.join(path, 'logs'))}",
        f"  {EXPORT_COMMAND} {quoted}   # SavedModel + ONNX into saved_models/",
        f"  {PREDICT_COMMAND} {shlex.quote(onnx)} IMAGE.png",
        f"  {REPORT_COMMAND} {quoted} [OTHER_RUN ...] -o curves.png",
    ]
    return lines


# ------------------------------------------------------------------------ CLI
def main(argv=None):
    parser = OneLineParser(
        prog=REPORT_COMMAND,
        description="Error curves (PNG) and a table of keras-local runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("-o", "--output", default="curves.png",
                        help="PNG of the test and training error curves (default: curves.png)")
    args = parser.parse_args(argv)
    if not args.output.lower().endswith(".png"):
        parser.error(f"--output {args.output!r}: must end in .png")
    if not os.path.isdir(os.path.dirname(args.output) or "."):
        parser.error(f"--output {args.output!r}: no such directory "
                     f"{os.path.dirname(args.output)!r}")
    try:
        runs = [read_run(path) for path in args.runs]
    except ReportError as error:
        parser.exit(EXIT_BAD_INPUT, f"{parser.prog}: error: {error}\n")
    print(table(runs))
    draw_curves(runs, args.output)
    print(f"curves: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
