#!/usr/bin/env python
"""Peak memory of one training step, local predsim vs backprop, against depth.

    python benchmarks/memory.py                   # vgg8b ... vgg19, resnet18, wresnet16-4
    python benchmarks/memory.py --xla step        # the whole step under XLA, for comparison
    python benchmarks/memory.py --quick           # seconds (tests): vgg8b on 16x16x3

Every (model, mode) runs in its own subprocess on 32x32x3 inputs at batch 128 (the
CIFAR-10 vgg recipe options: dropout 0.2, leakyrelu, dim_in_decoder 2048). The child
builds the model, runs two training steps (the first traces and compiles), and takes
its baseline there: the bytes the TensorFlow allocator holds between steps (weights,
BatchNorm statistics, optimiser slots). It then resets the allocator's statistics and
runs one more step; the result is that step's peak bytes in use above the baseline
(``tf.config.experimental.get_memory_info`` on "GPU:0", or on "CPU:0").

Why not the process's RSS on CPU: TensorFlow's CPU allocator may be a pool that never
returns memory to the kernel (oneDNN builds: MklCPUAllocator), so after the first step
the RSS stays at the first step's peak (plus XLA/graph compilation memory) and a later
step's peak cannot be seen in it. The allocator's own statistics count every tensor and
XLA buffer of the step. Some CPU builds (the AVX2 TF 2.21 wheel) use a plain allocator
without statistics by default; the child is therefore started with
TF_CPU_ALLOCATOR_USE_BFC=true, which makes TensorFlow use its BFC allocator on the CPU,
with statistics. Where an allocator still keeps no statistics the child falls back to
peak RSS: VmHWM reset through /proc/self/clear_refs ("5"), or VmRSS sampled every
millisecond, with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the
kernel. The JSON also records the process's RSS after build and its overall peak RSS.

Prints a table (peak above baseline, MiB, both modes, local/backprop ratio), writes JSON
(``--json``) and a PNG bar chart of both modes per model, in the order of ``--models``
(``--plot``).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MODES, compile_for_xla, save_figure, tagged_json, write_json  # noqa: E402

MODELS = ("vgg8b", "vgg11b", "vgg13", "vgg16", "vgg19", "resnet18", "wresnet16-4")
RECIPE = dict(dropout=0.2, nonlin="leakyrelu", dim_in_decoder=2048)
MIB = 1024 * 1024


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--feat-mult", type=float, default=1.0, help="channel multiplier")
    p.add_argument("--modules", type=int, default=None,
                   help="group the local layers into K modules (default: every layer)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--xla", default="update", choices=("update", "none", "step"),
                   help="update: XLA-compiled optimiser update (LocalModel's default); "
                        "none: no XLA; step: the whole train step under XLA")
    p.add_argument("--steps", type=int, default=1, help="measured steps after the baseline")
    p.add_argument("--json", default=None,
                   help="default docs/memory.json (--quick: the temp directory)")
    p.add_argument("--plot", default="docs/memory_vs_depth.png", help="PNG; '' for none")
    p.add_argument("--quick", action="store_true",
                   help="seconds: vgg8b only on 16x16x3 at batch 8, no XLA, no plot")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.image_size = ["vgg8b"], 8, 16
        args.xla = "none"
        args.plot = ""
    if args.json is None:
        args.json = (os.path.join(tempfile.gettempdir(), "keras_local_memory_quick.json")
                     if args.quick else "docs/memory.json")
    return args


# --------------------------------------------------------------------- child
def _status_kib(field):
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    """True when the kernel's peak-RSS mark (VmHWM) was reset to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


class _RssSampler:
    """Fallback: the largest VmRSS seen by a thread polling every millisecond."""

    def __enter__(self):
        self.peak_kib = _status_kib("VmRSS")
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak_kib = max(self.peak_kib, _status_kib("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def _release_free_memory():
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def child(model_name, mode, args):
    """Measure one configuration in this process; prints one JSON line."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_local.config import Config
    from keras_local.run.training import build_model

    config = Config(model=model_name, batch_size=args.batch_size,
                    jit_compile=args.xla != "none", backprop=mode == "backprop",
                    feat_mult=args.feat_mult, modules=None if mode == "backprop" else args.modules,
                    **RECIPE)
    keras.utils.set_random_seed(config.seed)
    shape = (args.image_size, args.image_size, 3)
    model = compile_for_xla(build_model(model_name, shape, 10, config), args.xla)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size,) + shape).astype("float32")
    labels = rng.integers(0, 10, args.batch_size).astype("int32")
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    model.make_train_function()

    def step():
        logs = model.train_function(iterator)
        return {k: float(v) for k, v in logs.get_value().items()} if hasattr(
            logs, "get_value") else {k: float(v) for k, v in logs.items()}

    rss_after_build = _status_kib("VmRSS") / 1024
    for _ in range(2):  # trace + compile, then one ordinary step
        step()
    gpus = tf.config.list_physical_devices("GPU")
    device = "GPU:0" if gpus else "CPU:0"
    result = {"model": model_name, "mode": mode, "xla": args.xla,
              "batch_size": args.batch_size, "input_shape": list(shape),
              "conv_layers": sum(1 for layer in model.local_blocks if layer.kind == "conv"),
              "parameters": model.count_params(),
              "trainable_mib": sum(v.numpy().nbytes for v in model.trainable_variables) / MIB,
              "device": gpus[0].name if gpus else "CPU",
              "rss_after_build_mib": rss_after_build}
    _release_free_memory()
    try:
        tf.config.experimental.reset_memory_stats(device)
        baseline = tf.config.experimental.get_memory_info(device)["current"]
        for _ in range(args.steps):
            step()
        peak = tf.config.experimental.get_memory_info(device)["peak"]
        result.update(method="TensorFlow allocator peak (get_memory_info)",
                      baseline_mib=baseline / MIB, peak_mib=peak / MIB)
    except (ValueError, RuntimeError):  # an allocator without statistics: peak RSS
        baseline_kib = _status_kib("VmRSS")
        if _reset_peak_rss():
            for _ in range(args.steps):
                step()
            peak_kib, method = _status_kib("VmHWM"), "peak RSS (VmHWM after clear_refs)"
        else:
            with _RssSampler() as sampler:
                for _ in range(args.steps):
                    step()
            peak_kib, method = sampler.peak_kib, "peak RSS (VmRSS sampled every 1 ms)"
        result.update(method=method, baseline_mib=baseline_kib / 1024,
                      peak_mib=peak_kib / 1024)
    result["process_peak_rss_mib"] = _status_kib("VmHWM") / 1024
    result["peak_above_baseline_mib"] = result["peak_mib"] - result["baseline_mib"]
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------- parent
def measure(model_name, mode, args):
    command = [sys.executable, os.path.abspath(__file__), "--child", model_name, mode,
               "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
               "--steps", str(args.steps), "--xla", args.xla, "--feat-mult", str(args.feat_mult)]
    if args.modules is not None:
        command += ["--modules", str(args.modules)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               TF_CPU_ALLOCATOR_USE_BFC="true",
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    return tagged_json(done, "RESULT", f"{model_name} {mode}")


def plot(results, path, title):
    """Grouped bars per model (in the order measured; by default the VGGs by depth, then
    the ResNets): peak above baseline, both modes, with the predsim/backprop ratio above
    each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    value = {(r["model"], r["mode"]): r["peak_above_baseline_mib"] for r in results}
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(models)), 4.2))
    width = 0.38
    for offset, mode, colour in ((-width / 2, "predsim", "tab:blue"),
                                 (width / 2, "backprop", "tab:orange")):
        xs = [i + offset for i, m in enumerate(models) if (m, mode) in value]
        ys = [value[(m, mode)] for m in models if (m, mode) in value]
        ax.bar(xs, ys, width, color=colour,
               label="local predsim" if mode == "predsim" else "backprop")
    for i, m in enumerate(models):
        if (m, "predsim") in value and (m, "backprop") in value and value[(m, "backprop")]:
            top = max(value[(m, "predsim")], value[(m, "backprop")])
            ax.annotate(f"{value[(m, 'predsim')] / value[(m, 'backprop')]:.2f}x", (i, top),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    layers = {r["model"]: r["conv_layers"] for r in results}
    ax.set_xticks(range(len(models)), [f"{m}\n{layers[m]} conv" for m in models])
    ax.set_ylabel("peak of one step above baseline (MiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from keras_local.run.quiet import quiet_start

        quiet_start()  # imports TensorFlow without its C++ start-up noise
        child(*args.child, args)
        return 0
    results = []
    for model_name in args.models:
        for mode in args.modes:
            results.append(measure(model_name, mode, args))
            r = results[-1]
            print(f"  {model_name} {mode}: {r['peak_above_baseline_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)

    print(f"{'model':<12}{'conv layers':>12}{'predsim MiB':>13}{'backprop MiB':>14}"
          f"{'predsim/backprop':>18}")
    summary = []
    for model_name in args.models:
        by_mode = {r["mode"]: r["peak_above_baseline_mib"]
                   for r in results if r["model"] == model_name}
        layers = next(r["conv_layers"] for r in results if r["model"] == model_name)
        ratio = (by_mode["predsim"] / by_mode["backprop"]
                 if {"predsim", "backprop"} <= set(by_mode) and by_mode["backprop"] > 0
                 else None)
        summary.append({"model": model_name, "conv_layers": layers, **{
            f"{mode}_mib": value for mode, value in by_mode.items()}, "ratio": ratio})
        cells = [f"{by_mode[m]:.0f}" if m in by_mode else "-" for m in MODES]
        print(f"{model_name:<12}{layers:>12}{cells[0]:>13}{cells[1]:>14}"
              f"{'-' if ratio is None else f'{ratio:.2f}':>18}")
    device, method = results[0]["device"], results[0]["method"]
    print(f"peak above the baseline after build + 2 steps; {device}, {method}, batch "
          f"{args.batch_size}, {args.image_size}x{args.image_size}x3, XLA: {args.xla}")

    payload = {"device": device, "method": method, "xla": args.xla,
               "batch_size": args.batch_size, "image_size": args.image_size,
               "recipe": RECIPE, "results": results, "summary": summary}
    write_json(args.json, payload)
    if args.plot:
        xla = {"update": "XLA: update only (default)", "none": "no XLA",
               "step": "XLA: whole step"}[args.xla]
        plot(results, args.plot, f"one training step, batch {args.batch_size}, "
             f"{args.image_size}x{args.image_size}x3, {device}, {xla}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
