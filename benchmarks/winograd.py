"""Winograd F(2x2, 3x3) (keras_local.kernels.tensorflow.winograd) against oneDNN's direct kernels on the
maps of the VGG blocks: forward convolution and filter gradient, median milliseconds.

    python benchmarks/winograd.py            # one chunk of 16 examples (the chunked block's)
    python benchmarks/winograd.py --batch 128 --repeats 3
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHAPES = ((28, 128), (28, 256), (14, 256), (14, 512), (16, 256), (16, 512), (32, 128))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per kernel")
    p.add_argument("--shapes", nargs="+", default=[f"{s}x{c}" for s, c in SHAPES],
                   help="SIZExCHANNELS (square maps, as many channels in as out)")
    args = p.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    except ValueError:
        p.error(f"--shapes: expected SIZExCHANNELS such as 28x256, got {args.shapes}")
    if any(len(shape) != 2 or min(shape) < 1 for shape in args.shapes):
        p.error(f"--shapes: expected SIZExCHANNELS such as 28x256, got {args.shapes}")
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be at least 1")
    return args


def median_seconds(function, *inputs, repeats):
    function(*inputs)  # traces, creates the kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*inputs).numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf

    from keras_local.kernels.tensorflow import winograd as tf_winograd

    print(f"batch {args.batch}, median of {args.repeats} calls, ms "
          f"(GFLOP/s of the direct arithmetic)")
    print(f"{'map':>12}  {'forward direct':>16}  {'winograd':>16}  "
          f"{'filter direct':>16}  {'winograd':>16}  {'max rel diff':>12}")
    for size, channels in args.shapes:
        maps = tf.TensorSpec((None, size, size, channels))
        kernel_spec = tf.TensorSpec((3, 3, channels, channels))
        direct = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"),
                             input_signature=[maps, kernel_spec])
        direct_filter = tf.function(
            lambda x, dy, c=channels: tf.compat.v1.nn.conv2d_backprop_filter(
                x, (3, 3, c, c), dy, [1, 1, 1, 1], "SAME"), input_signature=[maps, maps])
        winograd = tf.function(tf_winograd.conv, input_signature=[maps, kernel_spec])
        winograd_filter = tf.function(tf_winograd.filter_gradient,
                                      input_signature=[maps, maps])
        x = tf.random.normal((args.batch, size, size, channels))
        dy = tf.random.normal((args.batch, size, size, channels))
        kernel = tf.random.normal((3, 3, channels, channels)) * 0.05
        flops = 2 * args.batch * size * size * channels * channels * 9
        cells, worst = [], 0.0
        for function, inputs in [(direct, (x, kernel)), (winograd, (x, kernel)),
                                 (direct_filter, (x, dy)), (winograd_filter, (x, dy))]:
            seconds = median_seconds(function, *inputs, repeats=args.repeats)
            cells.append(f"{seconds * 1e3:8.1f} ({flops / seconds / 1e9:4.0f})")
        for pair in [(direct(x, kernel), winograd(x, kernel)),
                     (direct_filter(x, dy), winograd_filter(x, dy))]:
            expected, got = (t.numpy() for t in pair)
            worst = max(worst, float(np.max(np.abs(got - expected)) / np.max(np.abs(expected))))
        label = f"{size}x{size}x{channels}"
        print(f"{label:>12}  " + "  ".join(f"{c:>16}" for c in cells) + f"  {worst:12.1e}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
