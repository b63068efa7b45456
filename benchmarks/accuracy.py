#!/usr/bin/env python
"""Test error of the paper's recipes as keras-local trains them, against the published numbers.

    python benchmarks/accuracy.py --recipe fashion_mnist-mlp-predsim fashion_mnist-mlp-backprop \
        --data-dir /usr/share/datasets/fashion-mnist --seed 1 --save-dir runs/accuracy
    python benchmarks/accuracy.py --runs runs/accuracy/RUN ... --out docs/accuracy_x  # plot only

Each recipe and seed trains with ``keras-local-train --recipe NAME --seed S`` in a process
of its own, in ``--save-dir``, every option at the recipe's value. A run of the same recipe
and seed already there is continued with ``--resume`` when it is unfinished (killed, the
machine restarted) and only read when finished, so a 200-epoch recipe can be taken up
again as often as needed. Any other flag is passed on to keras-local-train (e.g.
``--epochs 2`` for a short check; the run then records "NAME with changes").

Written from the runs' history.csv files (keras_local.report): OUT.png (test error per
epoch, with each recipe's published error as a dashed line), OUT.json (final and best test
error, epochs done, wall time of the epochs, run directory per run); a table is printed.
"""

import argparse
import csv
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save_figure, write_json  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", nargs="+", default=[], metavar="NAME",
                   help="recipes to train (keras-local-train --list-recipes)")
    p.add_argument("--seed", type=int, nargs="+", default=[1])
    p.add_argument("--save-dir", default=os.path.join("runs", "accuracy"))
    p.add_argument("--data-dir", default=None, help="the dataset's original files")
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN",
                   help="plot these run directories (nothing is trained)")
    p.add_argument("--out", default=None,
                   help="prefix of OUT.png and OUT.json (default: docs/accuracy_<recipe>)")
    args, train_flags = p.parse_known_args(argv)
    if not args.recipe and not args.runs:
        p.error("give --recipe NAME ... to train, or --runs RUN ... to plot")
    if args.recipe:
        from keras_local.recipes import get_recipe

        for name in args.recipe:
            try:
                get_recipe(name)
            except ValueError as error:
                p.error(str(error))
    if args.out is None:
        args.out = os.path.join("docs", "accuracy_" + "_".join(args.recipe or ["runs"]))
    args.train_flags = train_flags
    return args


def find_run(save_dir, recipe, seed):
    """The run directory of ``recipe`` (unchanged or "with changes") and ``seed`` in
    ``save_dir``, or None."""
    from keras_local.run.json_files import JSONFileError, read_json_file

    if not os.path.isdir(save_dir):
        return None
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        try:
            config = read_json_file(os.path.join(path, "config.json"))
        except (JSONFileError, OSError):
            continue
        recorded = str(config.get("recipe") or "")
        if (recorded == recipe or recorded.startswith(recipe + " with changes")) \
                and config.get("seed") == seed:
            return path
    return None


def train(args, recipe, seed):
    """Trains (or resumes) ``recipe`` with ``seed``; returns its run directory."""
    run = find_run(args.save_dir, recipe, seed)
    command = [sys.executable, "-m", "keras_local.cli.train"]
    if run is not None and os.path.isfile(os.path.join(run, "results.json")):
        print(f"{recipe} seed {seed}: finished in {run}", flush=True)
        return run
    if run is not None:
        print(f"{recipe} seed {seed}: resuming {run}", flush=True)
        command += ["--resume", run]
    else:
        command += ["--recipe", recipe, "--seed", str(seed), "--save-dir", args.save_dir]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        command += args.train_flags
        print(f"{recipe} seed {seed}: keras-local-train " + " ".join(command[3:]), flush=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise SystemExit(f"accuracy.py: keras-local-train exited {done.returncode} for "
                         f"{recipe} seed {seed}")
    return find_run(args.save_dir, recipe, seed)


def epoch_seconds(run_path):
    with open(os.path.join(run_path, "history.csv"), newline="") as stream:
        return sum(float(row.get("epoch_seconds") or 0) for row in csv.DictReader(stream))


def published_error(run):
    from keras_local.recipes import RECIPES

    recipe = RECIPES.get(str(run.config.get("recipe") or ""))
    return recipe.published_error if recipe is not None else None


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, run in enumerate(runs):
        colour = f"C{index}"
        label = f"{run.config.get('recipe') or run.label} seed {run.config.get('seed')}"
        ax.plot(run.epochs, run.test_error, "-", color=colour, label=label)
        published = published_error(run)
        if published is not None:
            ax.axhline(published, color=colour, linestyle="--", linewidth=1,
                       label=f"published {published:.2f}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    lowest = min(min(run.test_error) for run in runs)
    ax.set_ylim(max(0.0, lowest - 2), min(100.0, lowest + 10))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from keras_local.report import ReportError, read_run

    paths = list(args.runs)
    for recipe in args.recipe:
        for seed in args.seed:
            paths.append(train(args, recipe, seed))
    try:
        runs = [read_run(path) for path in paths]
    except ReportError as error:
        raise SystemExit(f"accuracy.py: {error}") from None
    rows = []
    for run in runs:
        rows.append({"run": run.path, "recipe": run.config.get("recipe"),
                     "seed": run.config.get("seed"), "epochs_done": len(run.epochs),
                     "epochs": run.config.get("epochs"), "finished": bool(run.results),
                     "final_test_error": run.final_test_error,
                     "best_test_error": run.best_test_error, "best_epoch": run.best_epoch,
                     "published_test_error": published_error(run),
                     "epoch_seconds_total": round(epoch_seconds(run.path), 1)})
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    plot(runs, args.out + ".png")
    write_json(args.out + ".json", {"runs": rows})
    print(f"{'recipe':<34}{'seed':>5}{'epochs':>9}{'final %':>9}{'best %':>8}"
          f"{'published %':>13}{'wall h':>8}")
    for row in rows:
        published = row["published_test_error"]
        print(f"{str(row['recipe'])[:33]:<34}{row['seed']:>5}"
              f"{row['epochs_done']:>5}/{row['epochs']:<3}{row['final_test_error']:>9.2f}"
              f"{row['best_test_error']:>8.2f}"
              f"{(f'{published:.2f}' if published is not None else '-'):>13}"
              f"{row['epoch_seconds_total'] / 3600:>8.2f}")
    print(f"wrote {args.out}.png, {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
