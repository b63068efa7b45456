#!/usr/bin/env python
"""The training input pipeline alone: images/s it delivers, per core and on all cores.

    python benchmarks/input_pipeline.py                          # cifar10, fashion_mnist
    python benchmarks/input_pipeline.py --datasets cifar10 --examples 50000 --epochs 2

Builds the training pipeline a run builds (``keras_local.data.make_datasets``: whole
batches gathered, normalised and augmented, random crop after zero padding and
horizontal flip where the dataset has them) over ``--examples`` generated uint8 images of
the dataset's shape, and reads every batch of ``--epochs`` epochs without training. The
first epoch includes tf.data's start; the table gives the last epoch's images/s:

- one core: TensorFlow's inter- and intra-op pools and tf.data's private pool of one
  thread each (what one core of a GPU machine's host delivers);
- all cores: TensorFlow's defaults (each setting runs in its own process).

``--train-images-per-second R`` adds the ratio of the pipeline's one-core rate to a
training step's rate R (from ``benchmarks/throughput.py``): the pipeline is never the
bottleneck while that ratio is well above 1. Writes JSON (``--json``).
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import hardware, hardware_line, loads_line, tagged_json, write_json  # noqa: E402

DATASETS = ("cifar10", "fashion_mnist")
TAG = "PIPELINE"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--examples", type=int, default=50000,
                   help="generated training images per epoch (default: 50000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="epochs read; the last is timed")
    p.add_argument("--train-images-per-second", type=float, default=None, metavar="R",
                   help="a training step's images/s, for the ratio column")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", nargs=2, metavar=("DATASET", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("examples", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    return args


def child(dataset, threads, args):
    """Time the pipeline in this process; prints one JSON line."""
    import numpy as np

    from keras_local.run.quiet import quiet_start

    quiet_start(import_tensorflow=True)  # as a run starts: oneDNN on, no start-up noise
    import tensorflow as tf

    if threads:
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    from keras_local.config import Config
    from keras_local.data.catalogue import get_dataset_info
    from keras_local.data.pipeline import make_datasets

    info = get_dataset_info(dataset)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.examples,) + info.input_shape, dtype=np.uint8)
    labels = (np.arange(args.examples) % info.num_classes).astype(np.int64)
    config = Config(dataset=dataset, batch_size=args.batch_size, seed=1)
    train_ds, _ = make_datasets(config, (images, labels), (images[:1], labels[:1]))
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        train_ds = train_ds.with_options(options)
    seconds = []
    for _ in range(args.epochs):
        start, seen = time.perf_counter(), 0
        for batch, _labels in train_ds:
            seen += int(batch.shape[0])
        seconds.append(time.perf_counter() - start)
    print(TAG, json.dumps({"dataset": dataset, "threads": threads or "all", "images": seen,
                      "epoch_seconds": seconds,
                      "images_per_second": seen / seconds[-1]}))


def measure(dataset, threads, args):
    command = [sys.executable, os.path.abspath(__file__), "--child", dataset, str(threads),
               "--examples", str(args.examples), "--batch-size", str(args.batch_size),
               "--epochs", str(args.epochs)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    return tagged_json(done, TAG, f"the {dataset} pipeline", require_exit_zero=True)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return child(args.child[0], int(args.child[1]), args)
    loads_before = os.getloadavg()
    print(f"{args.examples} generated images per epoch, batch {args.batch_size}, "
          f"last of {args.epochs} epochs timed")
    header = "| dataset | augmentation | images/s, 1 core | images/s, all cores |"
    rule = "| --- | --- | ---: | ---: |"
    if args.train_images_per_second:
        header += " 1 core / training step |"
        rule += " ---: |"
    print(header + "\n" + rule)
    from keras_local.data.catalogue import get_dataset_info

    results = []
    for dataset in args.datasets:
        info = get_dataset_info(dataset)
        one, every = measure(dataset, 1, args), measure(dataset, 0, args)
        augmentation = ", ".join(
            part for part, on in ((f"crop (pad {info.crop_padding})", info.crop_padding),
                                  ("flip", info.horizontal_flip)) if on) or "none"
        row = (f"| {dataset} | {augmentation} | {one['images_per_second']:,.0f} | "
               f"{every['images_per_second']:,.0f} |")
        if args.train_images_per_second:
            row += f" {one['images_per_second'] / args.train_images_per_second:,.0f}x |"
        print(row, flush=True)
        results.append({"dataset": dataset, "augmentation": augmentation,
                        "one_core": one, "all_cores": every})
    from keras_local.run.quiet import quiet_start

    quiet_start()  # hardware() lists GPUs through TensorFlow; without its start-up noise
    machine = hardware()
    print(hardware_line(machine))
    print(loads_line(loads_before, os.getloadavg()))
    if args.json:
        write_json(args.json, {"results": results, "machine": machine,
                               "train_images_per_second": args.train_images_per_second})
    return 0


if __name__ == "__main__":
    sys.exit(main())
