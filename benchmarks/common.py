"""What the benchmark scripts share: the timed models and their recipes, building and
compiling them through the library (its XLA policy), timing ``fit`` epochs with the
library's callback, running the authors' script, the machine's description, the load
average line and atomic result files.

The library's modules are imported here and in the scripts' own measuring code, not in
argument parsing: ``--help`` and argument errors start no Keras backend.
"""

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

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
MODES = ("predsim", "backprop")
# auto: LocalModel.compile's own choice; update / step: that part under XLA; none: no XLA.
XLA_CHOICES = ("auto", "update", "none", "step")
NUM_CLASSES = 10

# The authors' flags for each model's recipe (MODELS), and bench.py's (batches, warm-up).
REFERENCE_ARGS = {
    "mlp": (["--model", "mlp", "--dataset", "FashionMNIST", "--num-layers", "3",
             "--num-hidden", "1024", "--nonlin", "leakyrelu", "--dropout", "0.025"], 200, 10),
    "vgg8b": (["--model", "vgg8b", "--dataset", "FashionMNIST", "--nonlin", "leakyrelu",
               "--dropout", "0.1", "--dim-in-decoder", "1024"], 8, 2),
    "vgg11b": (["--model", "vgg11b", "--dataset", "CIFAR10", "--nonlin", "leakyrelu",
                "--dropout", "0.2", "--dim-in-decoder", "2048"], 6, 2),
}


# ------------------------------------------------------------------ arguments
def add_reference_argument(parser, default_from_env=True):
    text = ("folder with the authors' script set up as in docs/benchmarks.md section 1 "
            "(train.py, bench.py, venv/)")
    default = os.environ.get("KERAS_LOCAL_REFBENCH") or None if default_from_env else None
    if default_from_env:
        text += "; default: $KERAS_LOCAL_REFBENCH"
    parser.add_argument("--reference", metavar="W", default=default, help=text)


def fail(message):
    """One line naming the script and the bad value on stderr, exit code 2 (as argparse)."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_reference(parser, folder, needed):
    """``parser.error`` (one line, exit 2) unless ``folder`` holds the file ``needed``."""
    if not folder or not os.path.isfile(os.path.join(folder, needed)):
        parser.error(f"--reference {folder!r}: no {needed} there; set up the authors' "
                     "script as in docs/benchmarks.md section 1")


# ------------------------------------------------------------------ models
def compile_for_xla(model, xla):
    """``model.compile`` with the XLA choice ``xla`` (XLA_CHOICES): "auto" is what a
    training run does (``LocalModel.compile`` with ``Config.jit_compile``), "none" no XLA,
    "update" / "step" that part of the step under XLA (``xla_part``)."""
    if xla == "auto":
        model.compile()
    else:
        model.compile(jit_compile=False if xla == "none" else xla)
    return model


def xla_resolved(model):
    """The part of ``model``'s step that XLA compiles: "update", "step" or "none"."""
    if getattr(model, "xla_update", False):
        return "update"
    return "step" if model.jit_compile else "none"


def build_network(architecture, input_shape, mode, xla, batch_size, **options):
    """A LocalModel of ``architecture`` in ``mode`` ("predsim" or "backprop"), compiled
    with XLA choice ``xla``; ``options`` are Config fields."""
    import keras

    from keras_local.config import Config
    from keras_local.run.training import build_model

    config = Config(model=architecture, batch_size=batch_size, jit_compile=xla != "none",
                    backprop=mode == "backprop", **options)
    keras.utils.set_random_seed(config.seed)
    return compile_for_xla(build_model(architecture, input_shape, NUM_CLASSES, config), xla)


def build(name, mode, xla, args, **overrides):
    """``build_network`` for ``MODELS[name]``; ``args`` carries batch_size and optionally
    num_hidden, feat_mult, modules, precision, backend and loss_sup."""
    architecture, input_shape, recipe = MODELS[name]
    options = {key: getattr(args, key) for key in ("precision", "backend", "modules", "loss_sup")
               if getattr(args, key, None) is not None}
    width = "num_hidden" if architecture == "mlp" else "feat_mult"
    if getattr(args, width, None) is not None:
        options[width] = getattr(args, width)
    return build_network(architecture, input_shape, mode, xla, args.batch_size,
                         **{**recipe, **options, **overrides})


def cached_batches(input_shape, batch_size, num_classes=NUM_CLASSES):
    """One in-memory batch of standard-normal images, repeated forever."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size,) + tuple(input_shape)).astype("float32")
    labels = rng.integers(0, num_classes, batch_size).astype("int32")
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def timed_fit(model, dataset, steps):
    """Seconds of one ``fit`` epoch of ``steps`` steps: the library's ``epoch_seconds``
    (keras_local.run.callbacks.EpochTimes; the epoch-end logs it reads are already numbers,
    so the last step has finished)."""
    from keras_local.run.callbacks import EpochTimes

    history = model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False,
                        callbacks=[EpochTimes()])
    return history.history["epoch_seconds"][-1]


def time_variants(models, dataset, args):
    """{xla: (median seconds per step, images/s of each window, steps per window)}.

    Every model is warmed up (the first step traces and compiles), then the timed
    windows go round the models in turn, ``args.windows`` times."""
    steps = {}
    for xla, model in models.items():
        timed_fit(model, dataset, max(1, args.warmup_steps))
        estimate = timed_fit(model, dataset, 1)
        steps[xla] = max(2 if args.quick else 1, math.ceil(args.window_seconds / estimate))
    seconds = {xla: [] for xla in models}
    for _ in range(args.windows):
        for xla, model in models.items():
            seconds[xla].append(timed_fit(model, dataset, steps[xla]) / steps[xla])
    return {xla: (statistics.median(per_step), [args.batch_size / s for s in per_step],
                  steps[xla]) for xla, per_step in seconds.items()}


# ------------------------------------------------------------------ the authors' script
def reference_python(folder):
    """The reference folder's venv python, else this one."""
    python = os.path.join(folder, "venv", "bin", "python")
    return python if os.path.exists(python) else sys.executable


def load_reference_setup():
    """The namespace of the authors' train.py (in the working directory) after its
    module-level code up to the training loop: arguments (from ``sys.argv``), datasets,
    model, optimisers, ``train`` and ``test``. For the harnesses run in its venv."""
    source = open("train.py").read()
    marker = "''' The main training and testing loop '''"
    if marker not in source:
        raise SystemExit("train.py: not the authors' script (no training-loop marker)")
    namespace = {"__name__": "train_module", "__file__": "train.py"}
    exec(compile(source.split(marker)[0], "train.py", "exec"), namespace)
    return namespace


def run_bench(folder, name, mode, batch_size, batches=None, warmup=None, num_hidden=None,
              loss_sup=None):
    """One run of the authors' script through its ``bench.py`` on ``REFERENCE_ARGS[name]``
    (``batches`` / ``warmup`` default to the model's; ``loss_sup`` its --loss-sup): (its
    BENCH_JSON dict, wall seconds)."""
    folder = os.path.abspath(folder)
    flags, default_batches, default_warmup = REFERENCE_ARGS[name]
    if num_hidden is not None and name == "mlp":
        at = flags.index("--num-hidden") + 1
        flags = flags[:at] + [str(num_hidden)] + flags[at + 1:]
    command = [reference_python(folder), "-u", "bench.py",
               str(default_batches if batches is None else batches),
               str(default_warmup if warmup is None else warmup), *flags,
               "--batch-size", str(batch_size), "--no-cuda", "--save-dir", ""]
    if mode == "backprop":
        command.append("--backprop")
    if loss_sup is not None:
        command += ["--loss-sup", loss_sup]
    started = time.time()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    seconds = time.time() - started
    return tagged_json(done, "BENCH_JSON", f"reference {name} {mode} ({' '.join(command)})"), \
        seconds


def side_by_side(name, mode, args):
    """Alternating rounds: the reference once, then keras-local's default (``--xla auto``)
    for ``args.windows`` windows; medians over the rounds and their ratio."""
    model = build(name, mode, "auto", args)
    loss_sup = getattr(args, "loss_sup", None)  # throughput.py --loss-sup, on both sides
    _, input_shape, _ = MODELS[name]
    dataset = cached_batches(input_shape, args.batch_size)
    timed_fit(model, dataset, max(1, args.warmup_steps))
    steps = max(1, math.ceil(args.window_seconds / timed_fit(model, dataset, 1)))
    reference, ours, loads = [], [], []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        result, _ = run_bench(args.reference, name, mode, args.batch_size,
                              num_hidden=args.num_hidden, loss_sup=loss_sup)
        reference.append(result["img_per_s_compute_only"])
        windows = [args.batch_size * steps / timed_fit(model, dataset, steps)
                   for _ in range(args.windows)]
        ours.append(statistics.median(windows))
        print(f"  {name} {mode}: reference {reference[-1]:.1f}, keras-local {ours[-1]:.1f} "
              f"images/s (load {loads[-1]:.2f})", file=sys.stderr, flush=True)
    return {"model": name, "mode": f"{mode} ({loss_sup})" if loss_sup and mode != "backprop"
            else mode, "input_shape": list(input_shape),
            "xla_resolved": xla_resolved(model), "batch_size": args.batch_size,
            "reference_images_per_s": reference, "keras_local_images_per_s": ours,
            "reference_median": statistics.median(reference),
            "keras_local_median": statistics.median(ours),
            "ratio": statistics.median(ours) / statistics.median(reference),
            "load_average_1min": loads}


# ------------------------------------------------------------------ the machine
def cpu_model():
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware():
    """{"cpu", "cpu_cores", "gpus", "tensorflow_onednn"} of this machine and process."""
    gpus, onednn = [], None
    try:
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())  # oneDNN kernels in this process
    except (ImportError, AttributeError):
        pass
    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "gpus": gpus,
            "tensorflow_onednn": onednn}


def hardware_line(machine):
    return (f"CPU: {machine['cpu']} ({machine['cpu_cores']} cores); GPU: "
            f"{', '.join(machine['gpus']) or 'none'}; TensorFlow oneDNN kernels: "
            f"{machine['tensorflow_onednn']}")


def loads_line(before, after, label="load average (1, 5, 15 min) before / after: "):
    """One printed line of two ``os.getloadavg()`` readings."""
    return label + " / ".join(" ".join(f"{v:.2f}" for v in x) for x in (before, after))


# ------------------------------------------------------------------ result files
def tagged_json(done, tag, what, require_exit_zero=False):
    """The JSON after ``tag`` on the last stdout line of the finished process ``done``
    (``subprocess.run``'s result) that starts with it. RuntimeError naming ``what``, with
    the end of its stderr, where the process printed no such line (or, with
    ``require_exit_zero``, exited with another code)."""
    lines = [line for line in done.stdout.splitlines() if line.startswith(tag + " ")]
    if not lines or (require_exit_zero and done.returncode != 0):
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(tag) + 1:])


def _make_folder(path):
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)


def write_json(path, payload):
    """The library's atomic JSON write into a folder made if needed; prints where it went."""
    from keras_local.run.json_files import write_json_atomically

    _make_folder(path)
    write_json_atomically(path, payload)
    print(f"wrote {path}")


def save_figure(fig, path, dpi=110):
    """``fig.savefig`` whole or not at all, into a folder made if needed."""
    from keras_local.run.json_files import write_atomically

    _make_folder(path)
    write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=dpi))
