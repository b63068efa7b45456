#!/usr/bin/env python
"""Training throughput (images/s) of keras-local on the JAX backend, without TensorFlow.

    python benchmarks/jax_throughput.py                       # vgg8b 28x28x1, vgg11b 32x32x3
    python benchmarks/jax_throughput.py --models vgg8b --modes predsim backprop
    python benchmarks/jax_throughput.py --quick               # seconds, tiny widths (tests)

Sets KERAS_BACKEND=jax before Keras is imported and imports nothing of TensorFlow (nor
tf.data): it needs only keras, jax, numpy and h5py, and runs on the device JAX picks
(a GPU where a CUDA build of jaxlib is installed). ``model.fit`` runs on an in-memory
NumPy array of one random batch repeated ``steps`` times, so what is timed is the
jit-compiled train step (``keras_local.steps.jax``) plus Keras's per-step loop and the
host-to-device copy of each batch. A first ``fit`` of ``warmup`` steps compiles; then
``repeats`` fits of ``steps`` steps are timed and the median is reported.

From Python: ``measure("vgg8b")`` returns a dict with images_per_s (Keras must not have
been imported on another backend first).
"""

import argparse
import os
import statistics
import time

import numpy as np

# name -> (input shape, recipe options of docs/method.md section 10)
MODELS = {
    "vgg8b": ((28, 28, 1), dict(dropout=0.1, nonlin="leakyrelu", dim_in_decoder=1024)),
    "vgg11b": ((32, 32, 3), dict(dropout=0.2, nonlin="leakyrelu", dim_in_decoder=2048)),
}
NUM_CLASSES = 10


def measure(model_name, mode="predsim", batch_size=128, steps=20, warmup=2, repeats=3,
            **config_changes):
    """Median images/s of ``repeats`` timed fits of ``steps`` steps on the JAX backend."""
    import jax
    import keras

    import keras_local as kl

    if keras.backend.backend() != "jax":
        raise ValueError(f"jax_throughput needs KERAS_BACKEND=jax before Keras is imported; "
                         f"Keras runs on {keras.backend.backend()!r}")
    input_shape, recipe = MODELS[model_name]
    options = dict(recipe, batch_size=batch_size, backprop=mode == "backprop")
    if mode != "backprop":
        options["loss_sup"] = mode
    options.update(config_changes)
    model = kl.build_model(model_name, input_shape, NUM_CLASSES, kl.Config(**options))
    model.compile()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size,) + input_shape).astype("float32")
    y = rng.integers(0, NUM_CLASSES, batch_size).astype("int32")
    xs, ys = np.concatenate([x] * steps), np.concatenate([y] * steps)
    model.fit(xs[: batch_size * warmup], ys[: batch_size * warmup], batch_size=batch_size,
              epochs=1, shuffle=False, verbose=0)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        # The epoch's final logs are read back as Python floats: the clock stops only
        # after the last step has finished on the device.
        model.fit(xs, ys, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        seconds.append(time.perf_counter() - start)
    elapsed = statistics.median(seconds)
    device = jax.devices()[0]
    return {
        "model": model_name, "input_shape": list(input_shape), "mode": mode,
        "batch_size": batch_size, "steps": steps, "device": device.device_kind,
        "platform": device.platform, "step_ms": 1000 * elapsed / steps,
        "images_per_s": steps * batch_size / elapsed,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=("predsim", "pred", "sim", "backprop"),
                        default=["predsim"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="tiny widths, batch 16, 2 steps: checks that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.repeats = 16, 2, 1, 1
    changes = dict(feat_mult=1 / 16, num_hidden=32) if args.quick else {}
    for name in args.models:
        for mode in args.modes:
            result = measure(name, mode, args.batch_size, args.steps, args.warmup,
                             args.repeats, **changes)
            print(f"jax {result['device']} ({result['platform']}) {name} "
                  f"{'x'.join(map(str, result['input_shape']))} {mode} "
                  f"batch {result['batch_size']}: {result['images_per_s']:.0f} images/s "
                  f"({result['step_ms']:.1f} ms/step)", flush=True)


if __name__ == "__main__":
    os.environ["KERAS_BACKEND"] = "jax"
    from keras_local.run.quiet import quiet_start

    quiet_start()  # imports TensorFlow without its C++ start-up noise
    main()
