#!/usr/bin/env python
"""A full training epoch of train.py against a full epoch of the authors' script, side by side.

    python benchmarks/epoch.py --reference W            # Fashion-MNIST mlp 3x1024 predsim
    python benchmarks/epoch.py --reference W --rounds 3 --epochs 3

Both read the same files (Fashion-MNIST IDX from the Debian package dataset-fashion-mnist,
``--data-dir``) and run the recipe ``fashion_mnist-mlp-predsim`` (batch 128, dropout
0.025, leakyrelu, Adam 5e-4), data loading, augmentation (random crop, flip) and the
10,000-image test pass included:

- the reference: ``reference_epoch.py`` runs the authors' unmodified ``train.py`` set up in
  folder W (docs/benchmarks.md section 1) up to its training loop, then times its own
  ``train(1, lr)`` over the whole training loader and ``test(1)`` (its DataLoader loads and
  augments in the training process, as it does on CPU);
- keras-local: ``train.py --recipe fashion_mnist-mlp-predsim --epochs E`` in a fresh
  process; the time of each epoch is the ``epoch_seconds`` column of its history.csv
  (epoch start to end: input pipeline, steps, validation, callbacks). Epoch 1 includes
  tracing and XLA compilation, a one-off cost; the ratio uses the later epochs (the
  median of epochs 2..E), and epoch 1 is printed too.

Rounds alternate the two; the table gives the medians over rounds, the ratio, the CPU and
the load average. Writes JSON (``--json``, default docs/epoch.json).
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REFERENCE_ARGS, add_reference_argument, check_reference,  # noqa: E402
                    hardware, loads_line, reference_python, tagged_json, write_json)

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "fashion_mnist-mlp-predsim"
REFERENCE_FLAGS = REFERENCE_ARGS["mlp"][0] + ["--lr", "5e-4", "--batch-size", "128",
                                              "--no-cuda", "--save-dir", "", "--epochs", "1"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_reference_argument(p)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist",
                   help="Fashion-MNIST IDX files for keras-local")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    p.add_argument("--epochs", type=int, default=2,
                   help="keras-local epochs per round (the ratio uses epochs 2..E)")
    p.add_argument("--json", default=os.path.join(REPOSITORY, "docs", "epoch.json"))
    args = p.parse_args(argv)
    check_reference(p, args.reference, "train.py")
    if not os.path.isfile(os.path.join(args.data_dir, "train-images-idx3-ubyte.gz")):
        p.error(f"--data-dir {args.data_dir!r}: no Fashion-MNIST IDX files there "
                f"(apt-get install dataset-fashion-mnist)")
    if args.epochs < 2:
        p.error(f"--epochs {args.epochs}: need at least 2 (epoch 1 compiles)")
    return args


def reference_epoch(folder):
    """One full epoch (train + test) of the authors' script: {"train_s", "test_s"}."""
    python = reference_python(folder)
    harness = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_epoch.py")
    done = subprocess.run([python, "-u", harness, *REFERENCE_FLAGS], cwd=folder,
                          capture_output=True, text=True)
    return tagged_json(done, "EPOCH_JSON", "reference epoch")


def keras_local_epochs(args):
    """Seconds of each epoch of one train.py run (history.csv's epoch_seconds)."""
    with tempfile.TemporaryDirectory() as save_dir:
        command = [sys.executable, os.path.join(REPOSITORY, "train.py"), "--recipe", RECIPE,
                   "--data-dir", args.data_dir, "--epochs", str(args.epochs),
                   "--save-dir", save_dir, "--quiet"]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n"
                               f"{done.stderr[-2000:]}")
        [run_dir] = [os.path.join(save_dir, name) for name in os.listdir(save_dir)]
        with open(os.path.join(run_dir, "history.csv")) as stream:
            return [float(row["epoch_seconds"]) for row in csv.DictReader(stream)]


def main(argv=None):
    args = parse_args(argv)
    from keras_local.run.quiet import quiet_start

    quiet_start()  # hardware() lists GPUs through TensorFlow; without its start-up noise
    load_before = os.getloadavg()
    reference, ours_first, ours_later, loads = [], [], [], []
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        started = time.perf_counter()
        result = reference_epoch(args.reference)
        reference.append(result["train_s"] + result["test_s"])
        epochs = keras_local_epochs(args)
        ours_first.append(epochs[0])
        ours_later.append(statistics.median(epochs[1:]))
        print(f"  round {round_index + 1}: reference {reference[-1]:.1f} s "
              f"(train {result['train_s']:.1f} + test {result['test_s']:.1f}); keras-local "
              f"epoch 1 {epochs[0]:.1f} s, later {', '.join(f'{e:.1f}' for e in epochs[1:])} s "
              f"(load {loads[-1]:.2f}, {time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    machine = hardware()
    ref, first, later = (statistics.median(x) for x in (reference, ours_first, ours_later))
    print(f"{'full epoch, 60,000 + 10,000 images':<40}{'seconds':>9}{'images/s':>10}{'ratio':>8}")
    for name, seconds in (("reference (authors' train.py)", ref),
                          ("keras-local epoch 2..E", later),
                          ("keras-local epoch 1 (with compile)", first)):
        print(f"{name:<40}{seconds:>9.1f}{60000 / seconds:>10.0f}{ref / seconds:>7.2f}x")
    print(f"{RECIPE}, medians of {args.rounds} alternating rounds; ratio = reference "
          f"seconds / keras-local seconds")
    print(f"CPU: {machine['cpu']} ({machine['cpu_cores']} cores); TensorFlow oneDNN kernels "
          f"in train.py: on unless TF_ENABLE_ONEDNN_OPTS=0 (keras_local.run.quiet)")
    print(loads_line(load_before, load_after))
    payload = {"hardware": machine, "recipe": RECIPE, "rounds": args.rounds,
               "command": " ".join(["python", "benchmarks/epoch.py"] + sys.argv[1:]),
               "load_average_before": load_before, "load_average_after": load_after,
               "load_average_1min": loads, "reference_seconds": reference,
               "keras_local_epoch1_seconds": ours_first,
               "keras_local_later_epoch_seconds": ours_later,
               "ratio": ref / later}
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
