#!/usr/bin/env python
"""Learning curves of one recipe, local (predsim) vs backprop: train/test error per epoch.

    python benchmarks/accuracy.py --dataset fashion_mnist \
        --data-dir /usr/share/datasets/fashion-mnist --model mlp --num-layers 3 \
        --epochs 20 --lr-decay-milestones 10 15 17 19 --lr 5e-4 --dropout 0.025 \
        --nonlin leakyrelu --out docs/accuracy_fashion_mnist_mlp

Each mode trains with keras_local's own data pipeline (the dataset's normalisation and
augmentation), ``model.fit`` and the milestone schedule, one mode after the other in this
process. "train error" is the running error of the training epoch (dropout on, as the
reference reports it); "test error" is evaluated on the whole test set after each epoch.

Writes OUT.csv (one row per mode and epoch, appended as each epoch ends), OUT.png (error
curves) and OUT.json (final errors and wall time per mode), and prints a table.
``--quick``: the embedded demo data, 512 training images, 1 epoch, a 64-unit mlp.
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_json import write_json  # noqa: E402

CSV_FIELDS = ("mode", "epoch", "lr", "train_loss", "train_error", "test_loss", "test_error",
              "epoch_seconds")
MODES = ("predsim", "backprop")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="mlp")
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--num-hidden", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr-decay-milestones", type=int, nargs="+", default=[10, 15, 17, 19])
    p.add_argument("--dropout", type=float, default=0.025)
    p.add_argument("--nonlin", default="leakyrelu", choices=("relu", "leakyrelu"))
    p.add_argument("--dim-in-decoder", type=int, default=4096)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-jit", action="store_true", help="do not compile the step with XLA")
    p.add_argument("--out", default=None,
                   help="output prefix: OUT.csv, OUT.png, OUT.json (default docs/accuracy; "
                        "--quick: the temp directory)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw OUT.png from an existing OUT.csv and OUT.json")
    p.add_argument("--quick", action="store_true",
                   help="seconds: demo data, 512 images, 1 epoch, 64 hidden units")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.data_dir, args.model = "fashion_mnist_demo", None, "mlp"
        args.num_layers, args.num_hidden, args.epochs = 2, 64, 1
        args.max_train_examples, args.lr_decay_milestones = 512, [1]
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), "keras_local_accuracy_quick")
                    if args.quick else "docs/accuracy")
    return args


def mode_config(args, mode):
    from keras_local.config import Config

    return Config(dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                  num_layers=args.num_layers, num_hidden=args.num_hidden, epochs=args.epochs,
                  lr=args.lr, lr_decay_milestones=tuple(args.lr_decay_milestones),
                  dropout=args.dropout, nonlin=args.nonlin, dim_in_decoder=args.dim_in_decoder,
                  max_train_examples=args.max_train_examples, seed=args.seed,
                  jit_compile=not args.no_jit, backprop=mode == "backprop",
                  loss_sup="predsim")


def train_mode(args, mode, csv_path, arrays=None):
    """Train one mode; appends its rows to csv_path; returns (rows, wall seconds)."""
    import keras

    from keras_local.callbacks import milestone_scheduler
    from keras_local.data import load_arrays, make_datasets
    from keras_local.data.catalogue import get_dataset_info
    from keras_local.training import build_model
    from keras_local.optim import milestone_learning_rate

    config = mode_config(args, mode)
    info = get_dataset_info(config.dataset)
    train, test = arrays if arrays is not None else load_arrays(config)
    keras.utils.set_random_seed(config.seed)
    train_ds, test_ds = make_datasets(config, train, test)
    model = build_model(config.model, info.input_shape, info.num_classes, config)
    model.compile()
    rows = []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            row = {"mode": mode, "epoch": epoch + 1,
                   "lr": milestone_learning_rate(config, epoch),
                   "train_loss": float(logs["loss"]), "train_error": float(logs["error"]),
                   "test_loss": float(logs["val_loss"]), "test_error": float(logs["val_error"]),
                   "epoch_seconds": time.perf_counter() - self.started}
            rows.append(row)
            with open(csv_path, "a", newline="") as stream:
                csv.DictWriter(stream, CSV_FIELDS).writerow(
                    {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            print(f"{mode:>8} epoch {row['epoch']:3d}  lr {row['lr']:.2e}  "
                  f"train error {row['train_error']:6.2f}%  test error {row['test_error']:6.2f}%"
                  f"  ({row['epoch_seconds']:.0f} s)", flush=True)

    started = time.perf_counter()
    model.fit(train_ds, epochs=config.epochs, validation_data=test_ds, verbose=0, shuffle=False,
              callbacks=[milestone_scheduler(config), Recorder()])
    return rows, time.perf_counter() - started, (train, test)


def plot_title(dataset, model, num_layers, num_hidden, train_size):
    size = f" {num_layers}x{num_hidden}" if model == "mlp" else ""
    return f"{dataset} {model}{size}, {train_size:,} training images"


def plot(rows, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"predsim": "tab:blue", "backprop": "tab:orange"}
    for mode in MODES:
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        epochs = [r["epoch"] for r in mode_rows]
        ax.plot(epochs, [r["test_error"] for r in mode_rows], "-o", ms=3,
                color=colours[mode], label=f"{mode} test")
        ax.plot(epochs, [r["train_error"] for r in mode_rows], "--", color=colours[mode],
                label=f"{mode} train")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path, json_path = (args.out + ext for ext in (".csv", ".png", ".json"))
    if args.replot:
        with open(csv_path) as stream:
            rows = [{**r, "epoch": int(r["epoch"]), "train_error": float(r["train_error"]),
                     "test_error": float(r["test_error"])} for r in csv.DictReader(stream)]
        with open(json_path) as stream:
            stored = json.load(stream)
        plot(rows, plot_title(stored["dataset"], stored["model"], stored["num_layers"],
                              stored["num_hidden"], stored["train_examples"]), png_path)
        print(f"wrote {png_path}")
        return 0
    from keras_local.quiet import quiet_start

    quiet_start()  # imports TensorFlow without its C++ start-up noise
    with open(csv_path, "w", newline="") as stream:
        csv.DictWriter(stream, CSV_FIELDS).writeheader()

    all_rows, summary, arrays = [], {}, None
    for mode in args.modes:
        rows, seconds, arrays = train_mode(args, mode, csv_path, arrays)
        all_rows.extend(rows)
        summary[mode] = {"final_test_error": rows[-1]["test_error"],
                         "best_test_error": min(r["test_error"] for r in rows),
                         "final_train_error": rows[-1]["train_error"],
                         "epochs": len(rows), "wall_seconds": round(seconds, 1)}
    train_size = len(arrays[0][0])
    plot(all_rows, plot_title(args.dataset, args.model, args.num_layers, args.num_hidden,
                              train_size), png_path)
    result = {"dataset": args.dataset, "model": args.model, "num_layers": args.num_layers,
              "num_hidden": args.num_hidden, "train_examples": train_size,
              "epochs": args.epochs, "lr": args.lr,
              "lr_decay_milestones": args.lr_decay_milestones, "dropout": args.dropout,
              "nonlin": args.nonlin, "modes": summary,
              "files": {"csv": csv_path, "png": png_path}}
    write_json(json_path, result)

    print()
    print(f"{'mode':<10}{'epochs':>7}{'final test error %':>20}{'best test error %':>19}"
          f"{'final train error %':>21}{'wall s':>9}")
    for mode, s in summary.items():
        print(f"{mode:<10}{s['epochs']:>7}{s['final_test_error']:>20.2f}"
              f"{s['best_test_error']:>19.2f}{s['final_train_error']:>21.2f}"
              f"{s['wall_seconds']:>9.0f}")
    print(f"wrote {csv_path}, {png_path}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
