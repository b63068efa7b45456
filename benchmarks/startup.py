#!/usr/bin/env python
"""Time to the first training step, and the steady step time, per family.

    python benchmarks/startup.py                              # mlp, vgg8b, vgg11b, resnet18
    python benchmarks/startup.py --models mlp --batch-size 16 --num-hidden 64 --steps 2
    python benchmarks/startup.py --reference W                # and the authors' script
    python benchmarks/startup.py --models vgg8b --xla none    # another XLA choice (A/B)
    python benchmarks/startup.py --xla-cache D; python benchmarks/startup.py --xla-cache D
                                  # XLA's program cache in D: cold (D empty), then warm

Each model runs in a fresh Python process (nothing imported or traced before), with the
recipe of ``throughput.MODELS`` (mlp 3x1024 and vgg8b on 28x28x1, vgg11b and resnet18 on
32x32x3, predsim, the default XLA choice), on one in-memory batch of random images
repeated. The child reports, in seconds since the parent launched it: TensorFlow and
keras-local imported, model built and compiled, and the end of its first ``fit`` step
(tracing, graph optimisation, XLA compilation and the step itself); then the median step
time of ``--steps`` more steps. Where the time goes inside the first step: the child's
``--trace`` splits it into tracing the step (Python) and its first run (Grappler, XLA,
the step).

``--reference W`` (the authors' script set up as in docs/benchmarks.md section 1) also
times it to the end of its first step: ``bench.py 1 0`` on the same recipe, its
interpreter start, imports, data and model set-up included (the process's wall time).
Figures from a machine shared with other jobs are meaningless; the table prints the load
average.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MODELS, REFERENCE_ARGS, XLA_CHOICES, add_reference_argument,  # noqa: E402
                    build, check_reference, run_bench, tagged_json, write_json, xla_resolved)

DEFAULT_MODELS = ("mlp", "vgg8b", "vgg11b", "resnet18")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steady steps timed after the first")
    p.add_argument("--num-hidden", type=int, default=None, help="mlp units (default: recipe)")
    p.add_argument("--feat-mult", type=float, default=None,
                   help="conv models' channel multiplier (default: the recipe's)")
    p.add_argument("--xla", default="auto", choices=XLA_CHOICES,
                   help="auto: the library's choice (LocalModel.compile); update: XLA compiles "
                        "only the optimiser update; none; step: the whole step")
    p.add_argument("--trace", action="store_true",
                   help="split the first step into tracing and first run (an extra trace "
                        "of the step outside fit)")
    add_reference_argument(p, default_from_env=False)
    p.add_argument("--xla-cache", default="none", metavar="DIR",
                   help="XLA's persistent cache of compiled programs, as keras-local-train "
                        "--xla-cache (default: none, every program compiled)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        p.error(f"--batch-size and --steps must be >= 1, got {args.batch_size} and {args.steps}")
    if args.reference:
        check_reference(p, args.reference, "bench.py")
    return args


def child(args):
    """Runs in the fresh process: prints STARTUP_JSON with seconds since the launch."""
    launched = float(os.environ["KERAS_LOCAL_STARTUP_LAUNCHED"])

    def since():
        return round(time.time() - launched, 2)

    times = {"python": since()}
    from keras_local.run.quiet import use_xla_cache

    times["xla_cache"] = use_xla_cache(args.xla_cache)  # before TensorFlow starts
    import tensorflow as tf

    times["tensorflow"] = since()
    import keras  # noqa: F401  (timed with keras-local's import)
    import numpy as np

    import keras_local.config  # noqa: F401
    import keras_local.run.training  # noqa: F401

    times["keras_local"] = since()
    model = build(args.child, "predsim", args.xla, args)  # as throughput.py's --xla
    input_shape = MODELS[args.child][1]
    times["built"] = since()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size,) + tuple(input_shape)).astype("float32")
    labels = rng.integers(0, model.num_classes, args.batch_size).astype("int32")
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    if args.trace:  # the same step outside fit: tracing, then its first run
        model.optimizer.build(model.trainable_variables)
        step = tf.function(model.train_step, jit_compile=model.jit_compile, autograph=False)
        started = time.perf_counter()
        concrete = step.get_concrete_function((images, labels))
        times["trace_seconds"] = round(time.perf_counter() - started, 2)
        times["graph_ops"] = len(concrete.graph.get_operations())
        started = time.perf_counter()
        float(concrete(tf.constant(images), tf.constant(labels))["loss"])
        times["first_run_seconds"] = round(time.perf_counter() - started, 2)
        times["built_again"] = since()
    history = model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0)
    float(history.history["loss"][-1])
    times["first_step"] = since()
    steps = []
    for _ in range(args.steps):
        started = time.perf_counter()
        history = model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0)
        float(history.history["loss"][-1])
        steps.append(time.perf_counter() - started)
    times["steady_step_seconds"] = round(statistics.median(steps), 3)
    times["xla"] = xla_resolved(model)
    print("STARTUP_JSON " + json.dumps(times), flush=True)


def run_child(name, args):
    command = [sys.executable, os.path.abspath(__file__), "--child", name,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--xla", args.xla, "--xla-cache", args.xla_cache]
    for flag, value in (("--num-hidden", args.num_hidden), ("--feat-mult", args.feat_mult)):
        if value is not None:
            command += [flag, str(value)]
    if args.trace:
        command.append("--trace")
    env = dict(os.environ, KERAS_LOCAL_STARTUP_LAUNCHED=repr(time.time()))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    return tagged_json(done, "STARTUP_JSON", f"keras-local {name}")


def run_reference(name, args):
    """Wall time of ``bench.py 1 0`` (the authors' script to the end of its first step)."""
    if name not in REFERENCE_ARGS:
        return None
    _, seconds = run_bench(args.reference, name, "predsim", args.batch_size, batches=1,
                           warmup=0)
    return round(seconds, 2)


def print_table(results, load):
    print(f"time to the end of the first training step (s, from process launch); batch "
          f"{results[0]['batch_size']}; load average {load}")
    print(f"{'model':9} {'input':9} {'xla':6} {'import':>7} {'built':>7} {'first step':>11} "
          f"{'steady step':>12} {'reference':>10} {'ratio':>6}")
    for r in results:
        reference = r.get("reference_first_step")
        ratio = f"{r['first_step'] / reference:.1f}x" if reference else "-"
        print(f"{r['model']:9} {r['input']:9} {r['xla']:6} {r['keras_local']:7.1f} "
              f"{r['built']:7.1f} {r['first_step']:11.1f} {r['steady_step_seconds']:12.3f} "
              f"{reference if reference else '-':>10} {ratio:>6}")
        if "trace_seconds" in r:
            print(f"{'':9} trace {r['trace_seconds']} s ({r['graph_ops']} ops in the step's "
                  f"graph), first run {r['first_run_seconds']} s")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    results = []
    for name in args.models:
        result = dict(model=name, input="x".join(map(str, MODELS[name][1])),
                      batch_size=args.batch_size, **run_child(name, args))
        if args.reference:
            result["reference_first_step"] = run_reference(name, args)
        results.append(result)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print_table(results, load)
    if args.json:
        write_json(args.json, {"load_average": load, "results": results})


if __name__ == "__main__":
    main()
