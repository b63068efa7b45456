#!/usr/bin/env python
"""Inference speed of an exported model: ONNX Runtime vs Keras, batch 1 and batch 256.

    python benchmarks/inference.py                 # mlp 3x1024, vgg8b (28x28x1), vgg11b (32x32x3)
    python benchmarks/inference.py --models mlp --batch 1 64
    python benchmarks/inference.py --quick         # seconds (tests)

For each model the script builds the network (weights do not change the speed), exports
it with ``keras_local.exporting.export_model(..., formats=("onnx",))`` (heads stripped,
float32, normalisation in the graph, parity self-checked) to a temporary directory, and
times the same deployable network three ways on raw-pixel inputs:

  onnxruntime     InferenceSession.run on model.onnx (CPUExecutionProvider, all cores)
  keras predict   Model.predict(x, batch_size=len(x)) on the deployable Keras network
                  (builds a tf.data pipeline per call: that overhead dominates batch 1)
  keras predict_on_batch   Model.predict_on_batch(x), the same network without tf.data
  keras call      a tf.function of network(x, training=False), outputs fetched as NumPy

Latency: median (and 90th percentile) over single calls at batch 1. Throughput: images/s,
median over timed windows at the largest batch. Prints a table, writes JSON.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import loads_line, write_json  # noqa: E402

MODELS = {
    "mlp": ("mlp", "fashion_mnist", dict(num_layers=3, num_hidden=1024)),
    "vgg8b": ("vgg8b", "fashion_mnist", dict(dim_in_decoder=1024)),
    "vgg11b": ("vgg11b", "cifar10", dict(dim_in_decoder=2048)),
}
RUNNERS = ("onnxruntime", "keras predict", "keras predict_on_batch", "keras call")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 256],
                   help="batch sizes: the first is timed as latency, the others as throughput")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="time spent per (model, runner, batch)")
    p.add_argument("--num-hidden", type=int, default=None, help="override the mlp width")
    p.add_argument("--json", default=None,
                   help="default docs/inference.json (--quick: the temp directory)")
    p.add_argument("--quick", action="store_true",
                   help="seconds: mlp 2x64 only, batches 1 and 16, short timing")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.num_hidden, args.batch, args.seconds = ["mlp"], 64, [1, 16], 0.3
    if args.json is None:
        args.json = (os.path.join(tempfile.gettempdir(), "keras_local_inference_quick.json")
                     if args.quick else "docs/inference.json")
    return args


def build_network(name, args):
    """(LocalModel, deployable Keras network: raw pixels -> logits)."""
    import keras

    from keras_local.config import Config
    from keras_local.data.catalogue import get_dataset_info
    from keras_local.exporting import deployable_model
    from keras_local.run.training import build_model

    architecture, dataset, options = MODELS[name]
    options = dict(options)
    if args.num_hidden is not None and architecture == "mlp":
        options.update(num_hidden=args.num_hidden, num_layers=2)
    config = Config(model=architecture, dataset=dataset, **options)
    info = get_dataset_info(dataset)
    keras.utils.set_random_seed(config.seed)
    model = build_model(architecture, info.input_shape, info.num_classes, config)
    return model, deployable_model(model)


def runners(model, network, onnx_path):
    """name -> function(images) -> logits as NumPy."""
    import onnxruntime
    import tensorflow as tf

    from keras_local.exporting import INPUT_NAME, OUTPUT_NAME

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    spec = tf.TensorSpec((None,) + tuple(model.example_shape), tf.float32)
    call = tf.function(lambda x: network(x, training=False), input_signature=[spec])
    return {
        "onnxruntime": lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0],
        "keras predict": lambda x: network.predict(x, batch_size=len(x), verbose=0),
        "keras predict_on_batch": network.predict_on_batch,
        "keras call": lambda x: call(x).numpy(),
    }


def time_calls(run, images, seconds):
    """Seconds of each call of run(images) for about ``seconds`` (after 3 warm-up calls)."""
    for _ in range(3):
        run(images)
    times, started = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - begin)
    return times


def benchmark(name, args, workdir):
    import numpy as np

    from keras_local.exporting import ONNX_FILE, export_model

    model, network = build_network(name, args)
    rng = np.random.default_rng(0)
    shape = tuple(model.example_shape)
    check = rng.integers(0, 256, (32,) + shape).astype("float32")
    out_dir = os.path.join(workdir, name)
    export_model(model, out_dir, formats=("onnx",), check_images=check)
    onnx_path = os.path.join(out_dir, ONNX_FILE)
    rows = []
    for runner, run in runners(model, network, onnx_path).items():
        for batch in args.batch:
            images = rng.integers(0, 256, (batch,) + shape).astype("float32")
            times = time_calls(run, images, args.seconds)
            median = statistics.median(times)
            rows.append({"model": name, "input_shape": list(shape), "runner": runner,
                         "batch": batch, "calls": len(times),
                         "median_ms": 1000 * median,
                         "p90_ms": 1000 * sorted(times)[int(0.9 * (len(times) - 1))],
                         "images_per_s": batch / median})
            print(f"  {name} {runner} batch {batch}: {1000 * median:.2f} ms",
                  file=sys.stderr, flush=True)
    return rows, os.path.getsize(onnx_path)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"  # export is TensorFlow-based
    from keras_local.run.quiet import quiet_start

    quiet_start()  # imports TensorFlow without its C++ start-up noise
    load_before = os.getloadavg()
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory(prefix="keras_local_inference_") as workdir:
        for name in args.models:
            model_rows, sizes[name] = benchmark(name, args, workdir)
            rows.extend(model_rows)
    load_after = os.getloadavg()

    latency_batch, throughput_batches = args.batch[0], args.batch[1:]
    print(f"{'model':<8}{'runner':<24}{f'latency b={latency_batch} ms':>18}{'p90 ms':>9}"
          + "".join(f"{f'img/s b={b}':>14}" for b in throughput_batches))
    for name in args.models:
        for runner in RUNNERS:
            cells = {r["batch"]: r for r in rows if r["model"] == name and r["runner"] == runner}
            line = (f"{name:<8}{runner:<24}{cells[latency_batch]['median_ms']:>18.2f}"
                    f"{cells[latency_batch]['p90_ms']:>9.2f}")
            line += "".join(f"{cells[b]['images_per_s']:>14.0f}" for b in throughput_batches)
            print(line)
    print(loads_line(load_before, load_after, "load average before / after: "))

    payload = {"cpu_cores": os.cpu_count(), "load_average_before": load_before,
               "load_average_after": load_after, "onnx_bytes": sizes,
               "latency_batch": latency_batch, "throughput_batches": throughput_batches,
               "results": rows}
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
