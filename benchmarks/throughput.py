#!/usr/bin/env python
"""Training throughput (images/s), local predsim vs backprop, with the arithmetic behind it.

    python benchmarks/throughput.py                       # mlp 3x1024, vgg8b, vgg11b
    python benchmarks/throughput.py --xla update none step --check-xla   # XLA choices
    python benchmarks/throughput.py --models mlp --precision mixed_bfloat16
    python benchmarks/throughput.py --backend jax         # another Keras backend
    python benchmarks/throughput.py --quick               # seconds (tests)
    python benchmarks/throughput.py --reference W --models mlp vgg8b   # side by side

Models (batch 128): mlp 3x1024 and vgg8b on 28x28x1 (10 classes), vgg11b on 32x32x3,
with the paper's recipe options (leakyrelu, dropout, dim_in_decoder). The input pipeline
is excluded: ``model.fit`` runs on one cached in-memory batch repeated
(``tf.data.Dataset.from_tensors(batch).repeat()``), so what is timed is the train step
plus Keras's per-step loop, the same step train.py runs. After warm-up (tracing, XLA
compilation) every window is one ``fit`` epoch of enough steps for ``--window-seconds``;
images/s is the median over windows.

XLA (``--xla``, TensorFlow): ``update`` XLA-compiles only the optimiser update, the
blocks run on TensorFlow's kernels in block order; ``step`` XLA-compiles the whole Keras
train step (Keras's own jit_compile); ``none`` (``--no-jit``) compiles nothing; ``auto``
(the default, ``--jit``) is what ``LocalModel.compile`` does with
``Config.jit_compile=True``: ``update`` for networks with conv blocks, ``step`` for
dense-only ones (the result column ``xla_resolved`` says which). On the JAX backend every
choice but ``none`` means jax.jit of the whole step; on torch the choice is ignored
(LocalModel leaves torch.compile off). Several choices are
measured window by window in turn, so a change of load on a shared machine hits them
alike. ``--check-xla`` trains each model 3 steps without XLA and with each XLA choice from
the same weights and prints the largest differences.

Next to the measured times the script prints the multiply-adds (MACs) of one training
step counted from the model's layers (``count_step_macs``: encoders, heads, similarity
matrices, output layer, forward and backward), the predsim/backprop step-time ratio
next to their arithmetic ratio, and the fraction of this machine's float32 matmul peak
(a ``tf.matmul`` loop, measured here) that each step reaches.

Side by side (``--reference W`` or ``KERAS_LOCAL_REFBENCH=W``; W is a folder set up as
in docs/benchmarks.md section 1: the authors' unmodified ``train.py``, ``bench.py``, the
torchvision stand-in and a ``venv`` with torch): for every model and mode, rounds alternate
one run of the authors' script (its compute-only images/s, ``bench.py``) with
``--windows`` timed windows of keras-local's default configuration on the same recipe;
the table gives both medians over the rounds, the ratio, the CPU and the load average.

Writes a JSON file (``--json``, default docs/throughput.json, side by side
docs/side_by_side.json; --quick: the temp dir).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MODELS, MODES, XLA_CHOICES, add_reference_argument, build,  # noqa: E402
                    cached_batches, check_reference, fail, hardware, hardware_line,
                    loads_line, side_by_side, time_variants, write_json, xla_resolved)
from macs import count_step_macs, measure_matmul_peak  # noqa: E402
from xla_check import check_xla, print_checks  # noqa: E402

DEFAULT_MODELS = ("mlp", "vgg8b", "vgg11b")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    p.add_argument("--feat-mult", type=float, default=None,
                   help="channel multiplier of the conv models (default: the recipe's)")
    p.add_argument("--modules", type=int, default=None,
                   help="group the local layers into K modules (default: every layer)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch-size", type=int, default=128)
    xla = p.add_mutually_exclusive_group()
    xla.add_argument("--xla", nargs="+", default=["auto"], choices=XLA_CHOICES,
                     help="auto: LocalModel's default (update for conv nets, step for "
                          "dense-only ones); update: XLA-compiled optimiser update only; "
                          "none: no XLA; step: the whole train step under XLA")
    xla.add_argument("--jit", dest="xla", action="store_const", const=["auto"],
                     help="same as --xla auto (jit_compile=True)")
    xla.add_argument("--no-jit", dest="xla", action="store_const", const=["none"],
                     help="same as --xla none (jit_compile=False; JAX: no jax.jit)")
    p.add_argument("--precision", default="float32",
                   choices=("float32", "mixed_float16", "mixed_bfloat16"),
                   help="Keras dtype policy (mixed precision pays off on GPUs)")
    p.add_argument("--backend", default="tensorflow", choices=("tensorflow", "jax", "torch"),
                   help="Keras backend (set before Keras is imported)")
    p.add_argument("--windows", type=int, default=5, help="timed windows")
    p.add_argument("--window-seconds", type=float, default=3.0,
                   help="target length of one timed window (at least one step)")
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="steps before timing (the first one traces and compiles)")
    p.add_argument("--matmul-size", type=int, default=2048,
                   help="square matmul size for the float32 peak; 0 skips it")
    p.add_argument("--num-hidden", type=int, default=None,
                   help="override the mlp width (default: the recipe's 1024)")
    p.add_argument("--loss-sup", default=None, choices=("pred", "sim", "predsim"),
                   help="the local loss of predsim mode, on both sides of --reference: "
                        "pred or sim alone shows what each head costs (default: the recipe's)")
    p.add_argument("--check-xla", action="store_true",
                   help="also train each model 3 steps with and without XLA from the same "
                        "weights (dropout off) and print the largest differences")
    p.add_argument("--json", default=None,
                   help="default docs/throughput.json (--quick: the temp directory)")
    p.add_argument("--quick", action="store_true",
                   help="seconds: mlp 3x128 only, 2 windows of 2 steps, small matmul")
    add_reference_argument(p)  # side by side; see the module docstring
    p.add_argument("--rounds", type=int, default=3,
                   help="side by side: alternating rounds (reference run, keras-local windows)")
    args = p.parse_args(argv)
    if args.reference:
        check_reference(p, args.reference, "bench.py")
    if args.quick:
        args.models, args.num_hidden = ["mlp"], 128
        args.windows, args.window_seconds, args.warmup_steps = 2, 0.0, 1
        args.matmul_size = 256
    if args.json is None:
        args.json = (os.path.join(tempfile.gettempdir(), "keras_local_throughput_quick.json")
                     if args.quick else
                     "docs/side_by_side.json" if args.reference else "docs/throughput.json")
    return args


# ------------------------------------------------------------- side by side
def main_side_by_side(args):
    load_before = os.getloadavg()
    results = [side_by_side(name, mode, args) for name in args.models for mode in args.modes]
    load_after = os.getloadavg()
    machine = hardware()
    print(f"{'model':<8}{'input':<10}{'mode':<18}{'xla':<8}{'reference img/s':>17}"
          f"{'keras-local img/s':>19}{'ratio':>8}")
    for r in results:
        shape = "x".join(str(d) for d in r["input_shape"])
        print(f"{r['model']:<8}{shape:<10}{r['mode']:<18}{r['xla_resolved']:<8}"
              f"{r['reference_median']:>17.1f}{r['keras_local_median']:>19.1f}"
              f"{r['ratio']:>7.2f}x")
    print(f"medians of {args.rounds} alternating rounds (reference: bench.py compute-only; "
          f"keras-local: median of {args.windows} windows per round), batch {args.batch_size}")
    print(hardware_line(machine))
    print(loads_line(load_before, load_after))
    payload = {"hardware": machine, "load_average_before": load_before,
               "load_average_after": load_after, "reference_folder": args.reference,
               "command": " ".join(["python", "benchmarks/throughput.py"] + sys.argv[1:]),
               "rounds": args.rounds, "windows": args.windows, "results": results}
    write_json(args.json, payload)
    return 0


def run_model(name, mode, args, peak):
    """One result dict per XLA choice for ``name`` in ``mode``."""
    models = {xla: build(name, mode, xla, args) for xla in args.xla}
    _, input_shape, _ = MODELS[name]
    timings = time_variants(models, cached_batches(input_shape, args.batch_size), args)
    macs = count_step_macs(next(iter(models.values())), args.batch_size)
    results = []
    for xla, (step_s, window_rates, steps) in timings.items():
        gflops = 2 * macs["step"] / step_s / 1e9
        results.append({
            "model": name, "input_shape": list(input_shape), "mode": mode,
            "backend": args.backend, "xla": xla, "xla_resolved": xla_resolved(models[xla]),
            "precision": args.precision,
            "batch_size": args.batch_size, "step_ms": 1000 * step_s,
            "images_per_s": args.batch_size / step_s,
            "window_images_per_s": [round(r, 2) for r in window_rates],
            "steps_per_window": steps, "step_macs": macs,
            "gflops": gflops, "fraction_of_peak": gflops / peak if peak else None})
    return results


def ratios(results):
    """Per model and XLA choice: predsim/backprop step-time and arithmetic (MAC) ratios."""
    rows = []
    for name, xla in dict.fromkeys((r["model"], r["xla"]) for r in results):
        by_mode = {r["mode"]: r for r in results if r["model"] == name and r["xla"] == xla}
        if set(MODES) <= set(by_mode):
            local, bp = by_mode["predsim"], by_mode["backprop"]
            rows.append({"model": name, "xla": xla,
                         "time_ratio": local["step_ms"] / bp["step_ms"],
                         "time_ratio_best": (max(bp["window_images_per_s"])
                                             / max(local["window_images_per_s"])),
                         "macs_ratio": local["step_macs"]["step"] / bp["step_macs"]["step"]})
    return rows


def check_backend(backend):
    """Exit with a clear message when keras_local has no train step for ``backend``."""
    import importlib

    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    step = {"tensorflow": "keras_local.steps.tensorflow", "jax": "keras_local.steps.jax",
            "torch": "keras_local.steps.torch"}[backend]
    for needed in (module, step):
        try:
            importlib.import_module(needed)
        except ImportError as error:
            fail(f"--backend {backend} needs {needed}, which cannot be imported here "
                 f"({error}); use --backend tensorflow")


def print_table(results, rows, peak):
    print(f"{'model':<8}{'input':<10}{'mode':<10}{'xla':<13}{'precision':<16}{'ms/step':>10}"
          f"{'images/s':>10}{'best':>9}{'GMAC/step':>11}{'GFLOP/s':>9}{'% peak':>8}")
    for r in results:
        shape = "x".join(str(d) for d in r["input_shape"])
        fraction = "" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.0f}"
        xla = r["xla"] if r["xla"] != "auto" else f"auto:{r['xla_resolved']}"
        print(f"{r['model']:<8}{shape:<10}{r['mode']:<18}{xla:<13}"
              f"{r['precision']:<16}{r['step_ms']:>10.1f}{r['images_per_s']:>10.1f}"
              f"{max(r['window_images_per_s']):>9.1f}"
              f"{r['step_macs']['step'] / 1e9:>11.1f}{r['gflops']:>9.1f}{fraction:>8}")
    print("images/s: median over the timed windows; best: the fastest window")
    if rows:
        print()
        print(f"{'model':<8}{'xla':<8}{'predsim/backprop time':>23}{'(best windows)':>16}"
              f"{'predsim/backprop MACs':>23}")
        for row in rows:
            print(f"{row['model']:<8}{row['xla']:<8}{row['time_ratio']:>23.2f}"
                  f"{row['time_ratio_best']:>16.2f}{row['macs_ratio']:>23.2f}")
    if peak:
        print(f"\nfloat32 matmul peak measured here (best of before and after): {peak:.1f} GFLOP/s")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != args.backend:
        fail(f"--backend {args.backend}: Keras was already imported on another backend")
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported
    from keras_local.run.quiet import quiet_start

    quiet_start()  # imports TensorFlow (quiet, oneDNN on) before anything else does
    check_backend(args.backend)
    if args.reference:
        return main_side_by_side(args)

    load_before = os.getloadavg()
    peak_timing = dict(repeats=1, seconds=0.2) if args.quick else {}
    peaks = [measure_matmul_peak(args.matmul_size, **peak_timing)] if args.matmul_size else []
    results = []
    for name in args.models:
        for mode in args.modes:
            for r in run_model(name, mode, args, peaks[0] if peaks else None):
                results.append(r)
                print(f"  {name} {mode} xla={r['xla']}: {r['images_per_s']:.1f} images/s",
                      file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    if args.matmul_size:  # the best of before and after: a busy moment only lowers it
        peaks.append(measure_matmul_peak(args.matmul_size, **peak_timing))
        for r in results:
            r["fraction_of_peak"] = r["gflops"] / max(peaks)
    peak = max(peaks) if peaks else None
    checks = []
    if args.check_xla:
        for name in args.models:
            for mode in args.modes:
                checks.extend(check_xla(name, mode, args))
    rows = ratios(results)
    print_table(results, rows, peak)
    print(loads_line(load_before, load_after))
    if checks:
        print_checks(checks)

    payload = {"hardware": hardware(), "matmul_peak_gflops": peak,
               "matmul_peak_measurements": peaks,
               "load_average_before": load_before, "load_average_after": load_after,
               "options": {"batch_size": args.batch_size, "xla": args.xla,
                           "precision": args.precision, "backend": args.backend,
                           "windows": args.windows, "quick": args.quick},
               "results": results, "ratios": rows, "xla_checks": checks}
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
