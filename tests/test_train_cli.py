import glob
import gzip
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import keras

import keras_local as kl
from keras_local.run.callbacks import AtomicCheckpoint, NaNGuard, NonFiniteLossError

from helpers import ROOT, console_script, help_text, history_epochs, history_rows, only_run_dir, read_json, to_numpy, train_main

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def train_cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for sub in ("train", "validation"):
        accumulator = EventAccumulator(os.path.join(log_dir, sub), size_guidance={"tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            events = accumulator.Tensors(tag)
            tags[f"{sub}/{tag}"] = [float(keras.ops.convert_to_numpy(
                __import__("tensorflow").make_ndarray(e.tensor_proto))) for e in events]
    return tags


@pytest.mark.slow  # real data, train + export in a subprocess
def test_cli_trains_fashion_mnist_end_to_end(tmp_path, fashion_mnist_idx_dir):
    save_dir = str(tmp_path / "runs")
    result = train_cli("--dataset", "fashion_mnist", "--data-dir", fashion_mnist_idx_dir,
                       "--model", "mlp", "--num-layers", "3", "--epochs", "1",
                       "--max-train-examples", "8000", "--save-dir", save_dir, "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = only_run_dir(save_dir)
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["num_layers"] == 3 and config["dataset"] == "fashion_mnist"
    scalars = tensorboard_scalars(os.path.join(run_dir, "logs"))
    for block in (1, 2, 3):
        for metric in ("pred_loss", "sim_loss", "error"):
            assert len(scalars[f"train/block_{block}/{metric}"]) == 1
    assert scalars["validation/epoch_error"][0] < 30.0
    assert scalars["train/epoch_learning_rate"] == [pytest.approx(5e-4)]
    rows = history_rows(run_dir)
    assert len(rows) == 1 and "block_3_sim_loss" in rows[0]
    results = read_json(os.path.join(run_dir, "results.json"))
    assert results["test_error"] == pytest.approx(float(rows[0]["val_error"]), abs=1e-3)
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "last.keras"))
    model = kl.load_model(os.path.join(run_dir, "model.keras"))
    assert isinstance(model, kl.LocalModel) and len(model.local_blocks) == 3
    export_dir = os.path.join(run_dir, "export")
    metadata = read_json(os.path.join(export_dir, "metadata.json"))
    assert metadata["test_error"] == pytest.approx(results["test_error"])
    assert os.path.isfile(os.path.join(export_dir, "model.onnx"))


@pytest.mark.slow  # two train.py runs in subprocesses, one killed mid-run
def test_killed_run_resumes_with_identical_optimizer_iterations(tmp_path):
    save_dir = str(tmp_path / "runs")
    args = ["--dataset", "fashion_mnist_demo", "--model", "mlp", "--num-hidden", "64",
            "--epochs", "4", "--max-train-examples", "4096", "--batch-size", "128",
            "--save-dir", save_dir, "--quiet", "--no-export", "--no-jit"]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args,
                                "--lr-decay-milestones", "2", "3"], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    metadata = None
    while time.time() < deadline and process.poll() is None:
        found = glob.glob(os.path.join(save_dir, "*", "backup", "training_metadata.json"))
        if found:
            metadata = found[0]
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert metadata is not None, "no epoch completed before the deadline"
    run_dir = only_run_dir(save_dir)
    assert not os.path.exists(os.path.join(run_dir, "results.json")), "finished before the kill"
    completed = read_json(metadata)["epoch"]
    assert 1 <= completed < 4

    result = train_cli("--resume", run_dir, "--quiet", "--no-export")
    assert result.returncode == 0, result.stderr[-2000:]
    model = kl.load_model(os.path.join(run_dir, "model.keras"))
    steps_per_epoch = 4096 // 128
    assert int(model.optimizer.iterations) == 4 * steps_per_epoch
    # the milestone schedule continued: epochs 2 and 3 decayed once and twice
    assert float(model.optimizer.learning_rate) == pytest.approx(5e-4 * 0.25**2)
    epochs = history_epochs(run_dir)
    assert epochs[-1] == 3 and sorted(set(epochs)) == [0, 1, 2, 3]


IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def make_empty(folder, source):
    folder.mkdir()
    return str(folder)


def make_corrupt(folder, source):
    folder.mkdir()
    for name in IDX_NAMES:
        (folder / name).write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    return str(folder)


def make_truncated(folder, source):
    folder.mkdir()
    for name in IDX_NAMES:
        raw = gzip.decompress(pathlib.Path(source, name).read_bytes())
        (folder / name).write_bytes(gzip.compress(raw[: len(raw) // 2], compresslevel=1))
    return str(folder)


@pytest.mark.parametrize("args,message", [
    (["--dataset", "imagenet21k"], "invalid choice: 'imagenet21k'"),
    (["--model", "resnet9"], "invalid choice: 'resnet9'"),
    (["--optim", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--dataset", "fashion_mnist", "--data-dir", "EMPTY"], "holds neither the fashion_mnist"),
    (["--dataset", "fashion_mnist", "--data-dir", "CORRUPT"], "cannot read"),
    (["--dataset", "fashion_mnist", "--data-dir", "TRUNCATED"], "truncated"),
    (["--resume", "EMPTY"], "not a run directory"),
    (["--beta", "2"], "beta must be in [0.0, 1.0]"),
    (["--pipeline"], "pipeline needs placement='layerwise'"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, message,
                                                   fashion_mnist_idx_dir, capsys):
    places = {"EMPTY": make_empty, "CORRUPT": make_corrupt, "TRUNCATED": make_truncated}
    args = [places[a](tmp_path / a.lower(), fashion_mnist_idx_dir) if a in places else a
            for a in args]
    save_dir = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(train_main([*args, "--save-dir", str(save_dir), "--epochs", "1"]))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("keras-local-train: error: "), stderr
    assert message in stderr
    assert not save_dir.exists()


def test_help_lists_every_reference_option():
    result = train_cli("--help")
    assert result.returncode == 0
    for flag in ("--dataset", "--model", "--batch-size", "--epochs", "--lr ",
                 "--lr-decay-milestones", "--lr-decay-fact", "--optim", "--momentum",
                 "--weight-decay", "--dropout", "--nonlin", "--loss-sup", "--backprop",
                 "--no-detach", "--beta", "--num-layers", "--num-hidden", "--dim-in-decoder",
                 "--feat-mult", "--no-batch-norm", "--bio", "--target-proj-size", "--cutout",
                 "--length", "--classes-per-batch", "--seed", "--save-dir", "--resume",
                 "--data-dir", "--max-train-examples"):
        assert flag in result.stdout, flag


class PoisonAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            kernel = self.model.output_layer.kernel
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, rng):
    model = kl.build_model("mlp", (4,), 3, kl.Config(num_hidden=8, jit_compile=False))
    model.compile()
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 3, 64).astype("int32")
    path = str(tmp_path / "last.keras")
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 1"):
        model.fit(x, y, batch_size=16, epochs=3, verbose=0,
                  callbacks=[PoisonAtEpoch(1), NaNGuard(), AtomicCheckpoint(path)])
    saved = kl.load_model(path)
    assert all(np.all(np.isfinite(to_numpy(v))) for v in saved.weights)
    assert int(saved.optimizer.iterations) == 4  # one epoch of 64 / 16


@pytest.mark.slow  # train.py subprocesses on logical devices
@pytest.mark.parametrize("scale_out", [["--strategy", "mirrored"],
                                       ["--placement", "layerwise", "--pipeline"]])
def test_cli_scale_out_options_train(tmp_path, scale_out):
    """The CLI wires --strategy / --placement / --pipeline to keras_local.run.distribute."""
    save_dir = str(tmp_path / "runs")
    result = train_cli("--dataset", "fashion_mnist_demo", "--model", "mlp", "--num-layers", "2",
                       "--num-hidden", "64", "--epochs", "2", "--max-train-examples", "1024",
                       "--save-dir", save_dir, "--quiet", "--no-export", *scale_out)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = only_run_dir(save_dir)
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["strategy"] == ("mirrored" if "--strategy" in scale_out else "auto")
    assert config["pipeline"] == ("--pipeline" in scale_out)
    results = read_json(os.path.join(run_dir, "results.json"))
    assert results["epochs_completed"] == 2 and results["test_error"] < 90.0


@pytest.mark.slow  # a whole train.py run in a subprocess
def test_says_what_the_first_step_does_before_it_starts(tmp_path):
    """The first step is silent for as long as tracing takes: a line says why first."""
    result = train_cli("--dataset", "fashion_mnist_demo", "--model", "mlp", "--num-layers",
                       "1", "--num-hidden", "32", "--epochs", "1", "--max-train-examples",
                       "256", "--no-export", "--save-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    notice = [i for i, line in enumerate(lines)
              if line.startswith("building the training step of mlp (1 local block): ")]
    assert len(notice) == 1 and "XLA compiles it" in lines[notice[0]], result.stdout
    assert lines[notice[0] - 1].startswith("mlp on fashion_mnist_demo: 256 training")
    assert lines[notice[0] + 1].startswith("the first step takes longer than the others")


# ------------------------------------------------------------- the console scripts
def declared_scripts():
    """pyproject.toml's [project.scripts] table, read as text (no tomllib on Python 3.10)."""
    text = pathlib.Path(ROOT, "pyproject.toml").read_text()
    table = text.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    return dict((part.strip().strip('"') for part in line.split("=", 1))
                for line in table.splitlines() if "=" in line)


def test_the_printed_command_names_are_the_declared_console_scripts():
    from keras_local.cli import EXPORT_COMMAND, PREDICT_COMMAND, REPORT_COMMAND, TRAIN_COMMAND

    assert declared_scripts() == {TRAIN_COMMAND: "keras_local.cli.train:main",
                                  EXPORT_COMMAND: "keras_local.cli.export:main",
                                  PREDICT_COMMAND: "keras_local.cli.predict:main",
                                  REPORT_COMMAND: "keras_local.report:main"}
    assert (TRAIN_COMMAND, EXPORT_COMMAND, PREDICT_COMMAND, REPORT_COMMAND) == (
        "keras-local-train", "keras-local-export", "keras-local-predict", "keras-local-report")


def test_bare_command_says_in_one_line_what_to_type(tmp_path):
    done = subprocess.run([console_script("keras-local-train")], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("keras-local-train: error: no options given; the defaults "
                                  "(--dataset cifar10 --model vgg8b, 400 epochs) download "
                                  "cifar10"), done.stderr
    assert done.stderr.endswith(" Offline demo: keras-local-train --dataset "
                                "fashion_mnist_demo --model mlp --epochs 3\n"), done.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, nothing downloaded


BACKEND_CHECK = """
import sys
from keras_local.cli.train import main
try:
    code = main({argv!r})
except SystemExit as exit:
    code = exit.code
loaded = [name for name in ("tensorflow", "keras", "jax", "torch") if name in sys.modules]
print("exit", code, "backends", loaded)
"""


@pytest.mark.parametrize("flag", ["--list-recipes", "--help"])
def test_list_recipes_and_help_import_no_backend(flag):
    done = subprocess.run([sys.executable, "-c", BACKEND_CHECK.format(argv=[flag])], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "exit 0 backends []", done.stdout[-2000:]
    if flag == "--help":
        assert lines[0].startswith("usage: keras-local-train "), lines[0]
    else:
        from keras_local.recipes import RECIPES

        assert len(lines) == 1 + len(RECIPES) + 1 and lines[0].startswith("recipe ")


def test_help_shows_every_default_as_it_runs_and_what_recipes_change():
    from keras_local.cli.train import make_parser

    text = help_text(make_parser())
    assert text.startswith("usage: keras-local-train ")
    for shown in ("--epochs EPOCHS training epochs (default: 400; recipes set it)",
                  "--lr LR initial learning rate (default: 0.0005; recipes set it)",
                  "--batch-size BATCH_SIZE examples per training batch (default: 128)",
                  "--nonlin {relu,leakyrelu} activation (default: relu; recipes set it)",
                  "--seed SEED random seed of weights, data order and dropout (default: 1)",
                  "(default: 200 300 350 375; recipes set it)",
                  "--lr-decay-fact LR_DECAY_FACT factor of each lr decay (default: 0.25)",
                  "--beta BETA predsim weight of sim (default: 0.99)",
                  "--optim {adam,amsgrad,sgd,keras_adam}",
                  "--dataset NAME one of ",
                  "--save-dir SAVE_DIR parent of the run directories (default: runs)",
                  "--cutout cutout augmentation (recipes set it)",
                  "--recipe none keeps these defaults"):
        assert shown in text, shown
    assert "(default: cifar10; recipes set it)" in text
    assert "(default: vgg8b; recipes set it)" in text


def test_help_defaults_are_configs_not_retyped():
    """No flag given (and no recipe): exactly Config's defaults; a changed Config default
    changes the parser and its help."""
    import dataclasses

    from keras_local.cli import train
    from keras_local.config import option

    args = train.parse_args(["--recipe", "none"])
    assert kl.Config(**train.recipe_config_values(args, ["--recipe", "none"])[0]) == kl.Config()

    @dataclasses.dataclass
    class ShortConfig(kl.Config):
        epochs: int = option(7, "training epochs", "optimisation")

    assert train.parse_args([], ShortConfig).epochs == 7
    assert "--epochs EPOCHS training epochs (default: 7; recipes set it)" in \
        help_text(train.make_parser(ShortConfig))


@pytest.mark.slow  # a whole demo run with its export, then export / predict / report
def test_printed_next_commands_are_console_scripts_that_work(tmp_path, fashion_mnist_demo):
    """The demo command the bare command suggests trains and exports; every command of its
    end-of-run summary is an installed console script, and each one runs as printed."""
    from keras_local.cli.train import DEMO_COMMAND

    save_dir = tmp_path / "runs"
    argv = DEMO_COMMAND.split()
    done = subprocess.run([console_script(argv[0]), *argv[1:], "--save-dir", str(save_dir)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = only_run_dir(str(save_dir))
    assert "python -m" not in done.stdout and "train.py" not in done.stdout
    lines = done.stdout.splitlines()
    assert f"  exported model   {run_dir}/export" in lines
    following = lines[lines.index("next:") + 1:]
    assert following[1:] == [
        f"  keras-local-export {run_dir}   # SavedModel + ONNX into saved_models/",
        f"  keras-local-predict {run_dir}/export/model.onnx IMAGE.png",
        f"  keras-local-report {run_dir} [OTHER_RUN ...] -o curves.png"]
    from PIL import Image

    Image.fromarray(fashion_mnist_demo[1][0][0][..., 0]).save(tmp_path / "IMAGE.png")
    outputs = {}
    for line in following[1:]:
        command = line.split("#")[0].replace("[OTHER_RUN ...]", "").split()
        ran = subprocess.run([console_script(command[0]), *command[1:]], cwd=tmp_path,
                             env=ENV, capture_output=True, text=True, timeout=600)
        assert ran.returncode == 0, (line, ran.stderr[-3000:])
        outputs[command[0]] = ran.stdout
    name = os.path.basename(run_dir)
    assert os.path.isfile(tmp_path / "saved_models" / name / "model.onnx")
    assert outputs["keras-local-predict"].startswith("IMAGE.png: ")
    assert os.path.isfile(tmp_path / "curves.png")
    assert outputs["keras-local-report"].splitlines()[-1] == "curves: curves.png"
