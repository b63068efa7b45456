"""Training throughput (images/s) of the scale-out modes on logical CPU devices.

    python benchmarks/scaling.py            # 2 rounds of 7 rows: about 5 minutes
    python benchmarks/scaling.py --quick    # the 4 main rows, a few steps each: a smoke test

Writes docs/scaling.json (``--json``; --quick: the temp dir).

Rows (each in a fresh process, since logical devices and thread pools are fixed when
TensorFlow starts):

  one device            the plain step (keras_local.steps.tensorflow), 1 logical CPU device
  mirrored, 2 devices   MirroredStrategy over 2 logical CPU devices, 128 per replica
  layerwise, 2 devices  blocks on 2 devices, the plain (sequential) step
  pipeline, 2 devices   blocks on 2 devices, decoupled pipelined step
  pipeline, 4 devices   blocks on 4 devices, decoupled pipelined step

Fairness on a 2-core machine: every logical device gets one intra-op thread (each op
runs single-threaded) and the runtime gets one inter-op thread per device (that many
ops may run at once), so N devices compute on at most N threads at once. Two reference rows show the
one-device step with the whole machine: two intra-op threads, and XLA (which
placement and strategies cannot use).

Every row runs --steps-per-execution training steps per call of the train function (16,
the pipelined default: within a call the pipelined step overlaps consecutive steps), except
mirrored: Keras 3.15's multi-step loop fails under MirroredStrategy with 2 replicas, so that
row runs one step per call.

Model: the 4-block MLP of the paper's Fashion-MNIST recipe width (mlp, num_layers=4,
num_hidden=1024, predsim, Adam, no dropout), 28x28x1 inputs, batch 128 per replica,
synthetic data (throughput does not depend on the values). The timed windows are the
epochs of one ``fit`` after a warm-up fit (one data iterator, steady state); "cores used"
is the process's CPU time over wall time in a window. Other processes on the same cores
distort the numbers: each row keeps its best timed window over all rounds, and the load
average is printed with every measurement.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, tagged_json, write_json  # noqa: E402

ROWS = [
    # name, devices, mode, intra-op threads per device, XLA, in --quick
    ("one device", 1, "one", 1, False, True),
    ("mirrored, 2 devices", 2, "mirrored", 1, False, True),
    ("layerwise, 2 devices", 2, "layerwise", 1, False, False),
    ("pipeline, 2 devices", 2, "pipeline", 1, False, True),
    ("pipeline, 4 devices", 4, "pipeline", 1, False, True),
    ("ref: one device, 2 threads", 1, "one", 2, False, False),
    ("ref: one device, 2 threads, XLA", 1, "one", 2, True, False),
]
BATCH = 128


def measure(devices, mode, intra, xla, steps, warmup, repeats, steps_per_execution):
    """Images/s of one configuration (runs in a fresh process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from keras_local.run.quiet import quiet_start

    quiet_start()  # imports TensorFlow without its C++ start-up noise
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(devices)])
    # Logical CPU devices share the process's thread pools: `intra` threads per op, and
    # as many ops at once as there are devices.
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(devices)

    import keras
    import numpy as np

    import keras_local as kl
    from keras_local.run.distribute import make_strategy

    config = kl.Config(
        model="mlp", num_layers=4, num_hidden=1024, dropout=0.0, optim="adam", lr=5e-4,
        jit_compile=xla,
        strategy="mirrored" if mode == "mirrored" else "one",
        placement="layerwise" if mode in ("layerwise", "pipeline") else "none",
        pipeline=mode == "pipeline")
    strategy = make_strategy(config)
    global_batch = BATCH * strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, global_batch).astype("int32")
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)
    with strategy.scope():
        model = kl.build_model("mlp", (28, 28, 1), 10, config)
        # Keras's multi-step loop fails under MirroredStrategy with 2 replicas (LocalModel
        # refuses it): that row runs one step per call.
        steps_per_execution = 1 if mode == "mirrored" else steps_per_execution
        model.compile(jit_compile=xla, steps_per_execution=steps_per_execution)
    model.fit(dataset, epochs=1, steps_per_epoch=warmup, verbose=0)
    # The timed windows are the epochs of one fit: one iterator for all of them. A fit per
    # window would time each iterator's teardown, which waits for tf.data's autotuning
    # thread to wake (up to about half the time since the iterator started; 0.2 s after
    # 15 pipelined steps here), as train.py avoids by keeping one iterator for the run.
    class WindowClock(keras.callbacks.Callback):
        """(wall seconds, process CPU seconds) of every epoch."""

        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, epoch, logs=None):
            self.times.append((time.perf_counter() - self.start[0],
                               time.process_time() - self.start[1]))

    windows = WindowClock()
    model.fit(dataset, epochs=repeats, steps_per_epoch=steps, verbose=0, callbacks=[windows])
    rates = [steps * global_batch / wall for wall, _ in windows.times]
    cores = [cpu / wall for wall, cpu in windows.times]
    best = int(np.argmax(rates))
    keras.backend.clear_session()
    return {"images_per_s": rates[best], "cores_used": cores[best], "all": rates,
            "global_batch": global_batch, "steps_per_execution": steps_per_execution}


def run_row(row, args):
    name = row[0]
    command = [sys.executable, os.path.abspath(__file__), "--row", json.dumps(row),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats),
               "--steps-per-execution", str(args.steps_per_execution)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    proc = subprocess.run(command, capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        return tagged_json(proc, "RESULT", f"row {name!r}", require_exit_zero=True)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per row (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (trace, fill)")
    parser.add_argument("--repeats", type=int, default=None, help="timed windows; best is kept")
    parser.add_argument("--steps-per-execution", type=int, default=16,
                        help="training steps per call of the train function, every row")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run the whole list this many times, keep each row's best")
    parser.add_argument("--json", default=None,
                        help="result file (default docs/scaling.json; --quick: the temp dir)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Many short timed windows, best kept: on cores shared with other jobs the best
    # window is the one least disturbed by them.
    args.steps = args.steps or (5 if args.quick else 32)
    args.warmup = args.warmup or (3 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 8)

    if args.row is not None:
        _, devices, mode, intra, xla, _ = json.loads(args.row)
        result = measure(devices, mode, intra, xla, args.steps, args.warmup, args.repeats,
                         args.steps_per_execution)
        print("RESULT " + json.dumps(result), flush=True)
        return

    load_before = os.getloadavg()
    print(f"4-block MLP (1024 units, predsim, Adam), batch {BATCH} per replica; "
          f"best of {args.repeats} windows of {args.steps} steps x {1 if args.quick else args.rounds} "
          f"rounds, {args.warmup} warm-up; "
          f"{os.cpu_count()} cores; load average before: "
          + " ".join(f"{v:.2f}" for v in load_before), flush=True)
    rows = [row for row in ROWS if row[5] or not args.quick]
    rounds = 1 if args.quick else args.rounds
    best = {}
    for round_index in range(rounds):
        for row in rows:
            result = run_row(row, args)
            if row[0] not in best or result["images_per_s"] > best[row[0]]["images_per_s"]:
                best[row[0]] = result
            print(f"  round {round_index + 1}/{rounds}: {row[0]}: "
                  f"{result['images_per_s']:.0f} images/s, {result['cores_used']:.2f} cores; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'configuration':34s} {'devices x threads':>17s} {'images/s':>9s} "
          f"{'vs one device':>13s} {'cores used':>10s} {'steps/call':>10s}")
    baseline = best[rows[0][0]]["images_per_s"]
    for name, devices, mode, intra, xla, in_quick in rows:
        rate = best[name]["images_per_s"]
        print(f"{name:34s} {f'{devices} x {intra}':>17s} {rate:9.0f} {rate / baseline:12.2f}x "
              f"{best[name]['cores_used']:10.2f} {best[name]['steps_per_execution']:10d}")
    load_after = os.getloadavg()
    print("load average after: " + " ".join(f"{v:.2f}" for v in load_after))
    default_json = (os.path.join(tempfile.gettempdir(), "keras_local_scaling.json") if args.quick
                    else os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       os.pardir, "docs", "scaling.json")))
    results = [dict(best[name], configuration=name, devices=devices, intra_op_threads=intra,
                    xla=xla, vs_one_device=best[name]["images_per_s"] / baseline)
               for name, devices, mode, intra, xla, _ in rows]
    write_json(args.json or default_json, {
        "command": " ".join(["python", "benchmarks/scaling.py"] + sys.argv[1:]),
        "cpu_cores": os.cpu_count(), "cpu": cpu_model(), "batch_per_replica": BATCH,
        "rounds": rounds, "repeats": args.repeats, "steps": args.steps,
        "load_average_before": load_before, "load_average_after": load_after,
        "results": results})


if __name__ == "__main__":
    main()
