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
measured window by window in turn, so a change of load on a shared machine hits them alike. ``--check-xla`` trains each model 3 steps without XLA and with
each XLA choice from the same weights and prints the largest differences.

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
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_json import cpu_model, tagged_json, write_json  # noqa: E402

# name -> (builder, input shape, recipe options); the recipes of docs/method.md section 10.
MODELS = {
    "mlp": ("mlp", (28, 28, 1), dict(num_layers=3, num_hidden=1024, dropout=0.025,
                                     nonlin="leakyrelu")),
    "vgg8b": ("vgg8b", (28, 28, 1), dict(dropout=0.1, nonlin="leakyrelu", dim_in_decoder=1024)),
    "vgg11b": ("vgg11b", (32, 32, 3), dict(dropout=0.2, nonlin="leakyrelu",
                                           dim_in_decoder=2048)),
    # ResNets (docs/method.md section 6): the script's defaults (not in the default list)
    "resnet18": ("resnet18", (32, 32, 3), dict()),
    "wresnet16-4": ("wresnet16-4", (32, 32, 3), dict()),
}
DEFAULT_MODELS = ("mlp", "vgg8b", "vgg11b")
MODES = ("predsim", "backprop")
XLA_CHOICES = ("auto", "update", "none", "step")
NUM_CLASSES = 10


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
    p.add_argument("--check-xla", action="store_true",
                   help="also train each model 3 steps with and without XLA from the same "
                        "weights (dropout off) and print the largest differences")
    p.add_argument("--json", default=None,
                   help="default docs/throughput.json (--quick: the temp directory)")
    p.add_argument("--quick", action="store_true",
                   help="seconds: mlp 3x128 only, 2 windows of 2 steps, small matmul")
    p.add_argument("--reference", default=os.environ.get("KERAS_LOCAL_REFBENCH") or None,
                   help="side by side with the authors' script set up in this folder "
                        "(default: $KERAS_LOCAL_REFBENCH); see the module docstring")
    p.add_argument("--rounds", type=int, default=3,
                   help="side by side: alternating rounds (reference run, keras-local windows)")
    args = p.parse_args(argv)
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
# The authors' flags for each model's recipe (MODELS), and bench.py's (batches, warm-up).
REFERENCE_ARGS = {
    "mlp": (["--model", "mlp", "--dataset", "FashionMNIST", "--num-layers", "3",
             "--num-hidden", "1024", "--nonlin", "leakyrelu", "--dropout", "0.025"], 200, 10),
    "vgg8b": (["--model", "vgg8b", "--dataset", "FashionMNIST", "--nonlin", "leakyrelu",
               "--dropout", "0.1", "--dim-in-decoder", "1024"], 8, 2),
    "vgg11b": (["--model", "vgg11b", "--dataset", "CIFAR10", "--nonlin", "leakyrelu",
                "--dropout", "0.2", "--dim-in-decoder", "2048"], 6, 2),
}


def run_reference(name, mode, args):
    """One run of the authors' script through ``bench.py``; its BENCH_JSON dict."""
    import subprocess

    folder = os.path.abspath(args.reference)
    python = os.path.join(folder, "venv", "bin", "python")
    if not os.path.exists(python):
        python = sys.executable
    flags, batches, warmup = REFERENCE_ARGS[name]
    if args.num_hidden is not None and name == "mlp":
        flags = flags[:flags.index("--num-hidden") + 1] + [str(args.num_hidden)] + \
            flags[flags.index("--num-hidden") + 2:]
    command = [python, "-u", "bench.py", str(batches), str(warmup), *flags,
               "--batch-size", str(args.batch_size), "--no-cuda", "--save-dir", ""]
    if mode == "backprop":
        command.append("--backprop")
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    return tagged_json(done, "BENCH_JSON", f"reference {name} {mode} ({' '.join(command)})")


def side_by_side(name, mode, args):
    """Alternating rounds: the reference once, then keras-local's default for
    ``args.windows`` windows; medians over the rounds and their ratio."""
    model = build(name, mode, "auto", args)
    _, input_shape, _ = MODELS[name]
    dataset = cached_batches(input_shape, args.batch_size)
    _timed_fit(model, dataset, max(1, args.warmup_steps))
    steps = max(1, math.ceil(args.window_seconds / _timed_fit(model, dataset, 1)))
    reference, ours, loads = [], [], []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        reference.append(run_reference(name, mode, args)["img_per_s_compute_only"])
        windows = [args.batch_size * steps / _timed_fit(model, dataset, steps)
                   for _ in range(args.windows)]
        ours.append(statistics.median(windows))
        print(f"  {name} {mode}: reference {reference[-1]:.1f}, keras-local {ours[-1]:.1f} "
              f"images/s (load {loads[-1]:.2f})", file=sys.stderr, flush=True)
    return {"model": name, "mode": mode, "input_shape": list(input_shape),
            "xla_resolved": _resolved(model), "batch_size": args.batch_size,
            "reference_images_per_s": reference, "keras_local_images_per_s": ours,
            "reference_median": statistics.median(reference),
            "keras_local_median": statistics.median(ours),
            "ratio": statistics.median(ours) / statistics.median(reference),
            "load_average_1min": loads}


def main_side_by_side(args):
    load_before = os.getloadavg()
    results = [side_by_side(name, mode, args) for name in args.models for mode in args.modes]
    load_after = os.getloadavg()
    machine = hardware()
    print(f"{'model':<8}{'input':<10}{'mode':<10}{'xla':<8}{'reference img/s':>17}"
          f"{'keras-local img/s':>19}{'ratio':>8}")
    for r in results:
        shape = "x".join(str(d) for d in r["input_shape"])
        print(f"{r['model']:<8}{shape:<10}{r['mode']:<10}{r['xla_resolved']:<8}"
              f"{r['reference_median']:>17.1f}{r['keras_local_median']:>19.1f}"
              f"{r['ratio']:>7.2f}x")
    print(f"medians of {args.rounds} alternating rounds (reference: bench.py compute-only; "
          f"keras-local: median of {args.windows} windows per round), batch {args.batch_size}")
    print(f"CPU: {machine['cpu']} ({machine['cpu_cores']} cores); GPU: "
          f"{', '.join(machine['gpus']) or 'none'}; TensorFlow oneDNN kernels: "
          f"{machine['tensorflow_onednn']}")
    print("load average (1, 5, 15 min) before / after: "
          + " / ".join(" ".join(f"{v:.2f}" for v in x) for x in (load_before, load_after)))
    payload = {"hardware": machine, "load_average_before": load_before,
               "load_average_after": load_after, "reference_folder": args.reference,
               "command": " ".join(["python", "benchmarks/throughput.py"] + sys.argv[1:]),
               "rounds": args.rounds, "windows": args.windows, "results": results}
    write_json(args.json, payload)
    return 0


# ------------------------------------------------------------------ arithmetic
def _conv_macs(layer, output_shape, batch):
    """MACs of a Conv2D forward: batch * H_out * W_out * (k * k * C_in * C_out)."""
    _, height, width, _ = output_shape
    return batch * height * width * math.prod(layer.kernel.shape)


def _dense_macs(layer, batch):
    return batch * math.prod(layer.kernel.shape)


def count_step_macs(model, batch_size):
    """Multiply-adds of one training step of ``model`` (a LocalModel) at ``batch_size``.

    Walks the model's layers and counts the forward MACs of the encoders (Conv2D /
    Dense), the heads (pred-head Dense, sim-head Conv2D / Dense) and the similarity
    matrices (S = X X^T of the sim head's features and of the labels; the spatial std
    that precedes it is counted as one MAC per element), and the output Dense.
    The backward pass of a layer costs two forward passes (input and weight
    gradients), one where the input gradient is not needed:

      backprop: encoders 3x (the first one 2x: no gradient w.r.t. the image), output 3x.
      local:    encoders 2x (the input is gradient-stopped), heads and similarities 3x
                (the gradient flows through them into h), output 2x.

    Returns a dict of forward MACs per part and ``step`` (the whole step's MACs).
    Element-wise ops (BatchNorm, activations, pooling, Adam) are not counted.
    """
    from keras_local.layers.block import LocalBlock

    shape = (batch_size,) + tuple(model.example_shape)
    parts = {"encoders": 0, "first_encoder": 0, "heads": 0, "similarity": 0, "output": 0}
    first = True
    for layer in model.feature_layers:
        out_shape = _with_batch(layer.compute_output_shape(shape), batch_size)
        if isinstance(layer, LocalBlock):
            # Residual convs pass (h, block input) pairs: the conv reads h.
            x_shape = shape[0] if isinstance(shape[0], tuple) else shape
            enc_out = (batch_size,) + tuple(layer.encoder.compute_output_shape(
                (batch_size,) + tuple(
                    layer.encoder_padding.compute_output_shape(x_shape)
                    if layer.encoder_padding is not None else x_shape)[1:]))[1:]
            macs = (_conv_macs(layer.encoder, enc_out, batch_size) if layer.kind == "conv"
                    else _dense_macs(layer.encoder, batch_size))
            shortcut = getattr(layer, "shortcut", None)
            if shortcut is not None:  # the 1x1 shortcut conv, trained with this block
                macs += _conv_macs(shortcut.encoder, enc_out, batch_size)
            parts["encoders"] += macs
            if first:
                parts["first_encoder"] = macs
                first = False
            parts["heads"] += _head_macs(layer, enc_out, batch_size)
            parts["similarity"] += _similarity_macs(layer, enc_out, batch_size)
        shape = out_shape
    parts["output"] = _dense_macs(model.output_layer, batch_size)
    if model.config.training_mode == "backprop":
        step = 3 * parts["encoders"] - parts["first_encoder"] + 3 * parts["output"]
    else:
        step = (2 * parts["encoders"] + 3 * (parts["heads"] + parts["similarity"])
                + 2 * parts["output"])
    return {**parts, "step": step}


def _with_batch(shape, batch):
    """``shape`` (or each shape of a pair) with its batch dimension set to ``batch``."""
    if isinstance(shape[0], tuple):
        return tuple(_with_batch(s, batch) for s in shape)
    return (batch,) + tuple(shape)[1:]


def _head_macs(block, h_shape, batch):
    macs = 0
    pred = block.heads.get("pred")
    if pred is not None:
        macs += _dense_macs(pred.dense, batch)
    sim = block.heads.get("sim")
    if sim is not None and sim.transform is not None and hasattr(sim.transform, "kernel"):
        if len(h_shape) == 4:
            macs += _conv_macs(sim.transform, h_shape, batch)
        else:
            macs += _dense_macs(sim.transform, batch)
    return macs


def _similarity_macs(block, h_shape, batch):
    """S(head(h)) and S(labels): B*B*features each, plus the spatial std of a map."""
    if "sim" not in block.heads:
        return 0
    if len(h_shape) == 4 and h_shape[-1] > 3 and h_shape[1] > 1:
        features = h_shape[-1]
        reduce = math.prod(h_shape)  # spatial std: about one MAC per element
    else:
        features = math.prod(h_shape[1:])
        reduce = 0
    return reduce + batch * batch * features + batch * batch * block.num_classes


# ------------------------------------------------------------------ measurements
def measure_matmul_peak(size, repeats=5, seconds=1.0):
    """Best float32 GFLOP/s of ``tf.matmul`` on square matrices of ``size`` and
    ``size // 2`` (the kernels train.py uses, all cores), one matmul after the other."""
    import tensorflow as tf

    best = 0.0
    for n in (size // 2, size):
        a = tf.random.normal((n, n), dtype=tf.float32)
        b = tf.random.normal((n, n), dtype=tf.float32)
        tf.matmul(a, b).numpy()
        for _ in range(repeats):
            calls, started = 0, time.perf_counter()
            while True:
                product = tf.matmul(a, b)  # eager CPU ops run one at a time, in order
                calls += 1
                if time.perf_counter() - started >= seconds:
                    break
            float(product[0, 0])
            elapsed = time.perf_counter() - started
            best = max(best, calls * 2 * n**3 / elapsed / 1e9)
    return best


def build(name, mode, xla, args, **overrides):
    """A compiled LocalModel for ``name`` in ``mode`` with XLA choice ``xla``."""
    import keras

    from keras_local.config import Config
    from keras_local.run.training import build_model

    architecture, input_shape, recipe = MODELS[name]
    options = dict(recipe)
    if args.num_hidden is not None and architecture == "mlp":
        options["num_hidden"] = args.num_hidden
    if getattr(args, "feat_mult", None) is not None and architecture != "mlp":
        options["feat_mult"] = args.feat_mult
    if getattr(args, "modules", None) is not None:
        options["modules"] = args.modules
    options.update(overrides)
    config = Config(model=architecture, batch_size=args.batch_size, jit_compile=xla != "none",
                    precision=args.precision, backend=args.backend,
                    backprop=mode == "backprop", **options)
    keras.utils.set_random_seed(config.seed)
    model = build_model(architecture, input_shape, NUM_CLASSES, config)
    if xla in ("update", "step") and args.backend == "tensorflow":
        model.compile(jit_compile=False)
        if xla == "update":
            model.xla_update = True  # keras_local.steps.tensorflow compiles the optimiser update
        else:
            model.jit_compile = True  # Keras compiles its whole train function with XLA
    else:  # auto: what LocalModel.compile does with Config.jit_compile=True
        model.compile(jit_compile=xla != "none")
    return model


def cached_batches(input_shape, batch_size):
    """One in-memory batch of standard-normal images, repeated forever."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size,) + tuple(input_shape)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, batch_size).astype("int32")
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def _timed_fit(model, dataset, steps):
    """Seconds of one ``fit`` epoch of ``steps`` steps, from epoch begin to epoch end
    (the epoch-end logs are read, which waits for the last step)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            {key: float(value) for key, value in (logs or {}).items()}
            self.seconds = time.perf_counter() - self.started

    timer = EpochTimer()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[timer])
    return timer.seconds


def time_variants(models, dataset, args):
    """{xla: (median seconds per step, images/s of each window, steps per window)}.

    Every model is warmed up (the first step traces and compiles), then the timed
    windows go round the models in turn, ``args.windows`` times."""
    steps = {}
    for xla, model in models.items():
        _timed_fit(model, dataset, max(1, args.warmup_steps))
        estimate = _timed_fit(model, dataset, 1)
        steps[xla] = max(2 if args.quick else 1, math.ceil(args.window_seconds / estimate))
    seconds = {xla: [] for xla in models}
    for _ in range(args.windows):
        for xla, model in models.items():
            seconds[xla].append(_timed_fit(model, dataset, steps[xla]) / steps[xla])
    return {xla: (statistics.median(per_step), [args.batch_size / s for s in per_step],
                  steps[xla]) for xla, per_step in seconds.items()}


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
            "backend": args.backend, "xla": xla, "xla_resolved": _resolved(models[xla]),
            "precision": args.precision,
            "batch_size": args.batch_size, "step_ms": 1000 * step_s,
            "images_per_s": args.batch_size / step_s,
            "window_images_per_s": [round(r, 2) for r in window_rates],
            "steps_per_window": steps, "step_macs": macs,
            "gflops": gflops, "fraction_of_peak": gflops / peak if peak else None})
    return results


def _resolved(model):
    if getattr(model, "xla_update", False):
        return "update"
    return "step" if model.jit_compile else "none"


def check_xla(name, mode, args, steps=3):
    """Largest differences between no XLA and each XLA choice after ``steps`` steps
    from the same weights on the same batch (dropout off: XLA draws other random
    masks): of the metrics, of the trainable weights, next to the largest change of a
    trainable weight in those steps. SGD with momentum (lr 0.01, 0.9), whose update is
    linear in the gradient: Adam's first steps are about +-lr for any gradient well
    above its epsilon, so on weights whose gradient is zero up to rounding (a bias
    before BatchNorm) it turns float rounding into +-lr differences. That the step runs
    at all shows that every op in the compiled part has an XLA kernel: a
    jit_compile=True function fails otherwise."""
    import numpy as np

    choices = ["none"] + [xla for xla in args.xla if xla != "none"] or ["update"]
    if choices == ["none"]:
        choices.append("update")
    models = {xla: build(name, mode, xla, args, dropout=0.0, optim="sgd", lr=0.01, momentum=0.9)
              for xla in choices}
    _, input_shape, _ = MODELS[name]
    initial = [np.asarray(w) for w in models["none"].trainable_variables]
    logs, weights = {}, {}
    for xla, model in models.items():
        iterator = iter(cached_batches(input_shape, args.batch_size))
        model.make_train_function()
        for _ in range(steps):
            out = model.train_function(iterator)
        out = out.get_value() if hasattr(out, "get_value") else out
        logs[xla] = {key: float(value) for key, value in out.items()}
        weights[xla] = [np.asarray(w) for w in model.trainable_variables]
    update = max(float(np.max(np.abs(a - b))) if a.size else 0.0
                 for a, b in zip(weights["none"], initial))
    checks = []
    for xla in choices[1:]:
        weight_diff = max(float(np.max(np.abs(a - b))) if a.size else 0.0
                          for a, b in zip(weights["none"], weights[xla]))
        checks.append({"model": name, "mode": mode, "xla": xla, "steps": steps,
                       "max_weight_diff": weight_diff, "max_update": update,
                       "max_metric_diff": max(abs(logs["none"][k] - logs[xla][k])
                                              for k in logs["none"]),
                       "loss_plain": logs["none"]["loss"], "loss_xla": logs[xla]["loss"]})
    return checks


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
            sys.exit(f"throughput.py: error: --backend {backend} needs {needed}, which cannot "
                     f"be imported here ({error}); use --backend tensorflow")


def hardware():
    cpu = cpu_model()
    gpus, onednn = [], None
    try:
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())  # oneDNN kernels in this process
    except (ImportError, AttributeError):
        pass
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "gpus": gpus, "tensorflow_onednn": onednn}


def print_table(results, rows, peak, load):
    print(f"{'model':<8}{'input':<10}{'mode':<10}{'xla':<13}{'precision':<16}{'ms/step':>10}"
          f"{'images/s':>10}{'best':>9}{'GMAC/step':>11}{'GFLOP/s':>9}{'% peak':>8}")
    for r in results:
        shape = "x".join(str(d) for d in r["input_shape"])
        fraction = "" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.0f}"
        xla = r["xla"] if r["xla"] != "auto" else f"auto:{r['xla_resolved']}"
        print(f"{r['model']:<8}{shape:<10}{r['mode']:<10}{xla:<13}"
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
    print(f"load average (1, 5, 15 min) before / after: {load[0]} / {load[1]}")


def print_checks(checks):
    print(f"\n{'no XLA vs XLA, 3 steps':<28}{'xla':<8}{'loss (none)':>12}{'loss (xla)':>12}"
          f"{'max |dmetric|':>15}{'max |dweight|':>15}{'max |update|':>14}")
    for c in checks:
        print(f"{c['model'] + ' ' + c['mode']:<28}{c['xla']:<8}{c['loss_plain']:>12.6f}"
              f"{c['loss_xla']:>12.6f}{c['max_metric_diff']:>15.2e}"
              f"{c['max_weight_diff']:>15.2e}{c['max_update']:>14.2e}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != args.backend:
        sys.exit("throughput.py: error: Keras was already imported on another backend")
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported
    from keras_local.run.quiet import quiet_start

    quiet_start()  # imports TensorFlow (quiet, oneDNN on) before anything else does
    check_backend(args.backend)
    if args.reference:
        if not os.path.exists(os.path.join(args.reference, "bench.py")):
            sys.exit(f"throughput.py: error: --reference {args.reference}: no bench.py there; "
                     "set it up as docs/benchmarks.md section 1 says")
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
    load = tuple(" ".join(f"{v:.2f}" for v in x) for x in (load_before, load_after))
    print_table(results, rows, peak, load)
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
