"""The benchmark scripts run end to end with --quick; checks output format, not speed."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.tensorflow_only


def run_script(name, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# throughput.py --quick times 4 configurations (predsim/backprop x XLA update/none) and
# checks XLA against the plain step; memory.py --quick runs a subprocess per mode. Each
# took over 2 minutes on 2 busy cores: slow (pytest -m slow), like the accuracy.py and
# inference.py runs below. The default run keeps throughput.py's MAC counting and the plot.
@pytest.mark.slow
def test_throughput_quick(tmp_path):
    out = tmp_path / "throughput.json"
    stdout = run_script("throughput.py", "--quick", "--xla", "update", "none",
                        "--check-xla", "--json", str(out))
    assert "model   input     mode      xla          precision" in stdout and "best" in stdout
    assert "predsim/backprop time" in stdout and "float32 matmul peak" in stdout
    assert "no XLA vs XLA, 3 steps" in stdout
    payload = json.loads(out.read_text())
    assert {"hardware", "matmul_peak_gflops", "results", "ratios", "options",
            "xla_checks"} <= set(payload)
    assert {(r["mode"], r["xla"]) for r in payload["results"]} == {
        (mode, xla) for mode in ("predsim", "backprop") for xla in ("update", "none")}
    for result in payload["results"]:
        assert {"model", "images_per_s", "step_ms", "step_macs", "gflops",
                "fraction_of_peak", "window_images_per_s"} <= set(result)
        assert result["images_per_s"] > 0
    ratio = payload["ratios"][0]
    assert ratio["model"] == "mlp" and ratio["time_ratio"] > 0 and ratio["macs_ratio"] > 1
    for check in payload["xla_checks"]:  # the XLA-compiled update equals the plain one
        assert check["xla"] == "update" and check["loss_plain"] == check["loss_xla"]
        assert check["max_weight_diff"] < 0.05 * check["max_update"]


def benchmarks_module(name):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def test_xla_choices_go_through_the_library_policy():
    """auto is what a training run compiles (the whole step for a dense-only net, the
    optimiser update for a conv net); update / step ask the library for that part."""
    common = benchmarks_module("common")
    args = type("Args", (), {"batch_size": 4, "num_hidden": 8, "feat_mult": 1 / 32})
    models = {(name, xla): common.build(name, "predsim", xla, args)
              for name in ("mlp", "vgg8b") for xla in common.XLA_CHOICES}
    parts = {key: common.xla_resolved(model) for key, model in models.items()}
    # the recipe's options, with the width override that fits each family
    mlp, vgg = models["mlp", "auto"].config, models["vgg8b", "auto"].config
    assert (mlp.num_hidden, mlp.num_layers, mlp.dropout, mlp.nonlin) == (8, 3, 0.025, "leakyrelu")
    assert (vgg.feat_mult, vgg.dim_in_decoder, vgg.dropout) == (1 / 32, 1024, 0.1)
    assert vgg.num_hidden != 8 and mlp.feat_mult != 1 / 32
    assert parts == {("mlp", "auto"): "step", ("vgg8b", "auto"): "update",
                     ("mlp", "none"): "none", ("vgg8b", "none"): "none",
                     ("mlp", "update"): "update", ("vgg8b", "update"): "update",
                     ("mlp", "step"): "step", ("vgg8b", "step"): "step"}


def test_timed_fit_runs_the_steps_and_reads_the_library_epoch_time():
    common = benchmarks_module("common")
    args = type("Args", (), {"batch_size": 4, "num_hidden": 8})
    model = common.build("mlp", "predsim", "none", args)
    seconds = common.timed_fit(model, common.cached_batches((28, 28, 1), 4), 3)
    assert seconds > 0 and int(model.optimizer.iterations) == 3


def test_run_bench_passes_the_recipe_and_mode_to_the_authors_bench(tmp_path):
    """A stand-in bench.py that echoes its arguments: the recipe flags of REFERENCE_ARGS,
    the mlp width override, --backprop, and bench.py's batches and warm-up."""
    common = benchmarks_module("common")
    (tmp_path / "bench.py").write_text(
        "import json, sys\nprint('BENCH_JSON ' + json.dumps({'argv': sys.argv[1:]}))\n")
    result, seconds = common.run_bench(str(tmp_path), "mlp", "backprop", 16, num_hidden=64)
    argv = result["argv"]
    assert argv[:2] == ["200", "10"] and seconds > 0
    assert argv[argv.index("--num-hidden") + 1] == "64" and argv.count("--num-hidden") == 1
    assert argv[argv.index("--batch-size") + 1] == "16" and argv[-1] == "--backprop"
    result, _ = common.run_bench(str(tmp_path), "vgg8b", "predsim", 8, batches=1, warmup=0)
    assert result["argv"][:2] == ["1", "0"] and "--backprop" not in result["argv"]
    assert "--dim-in-decoder" in result["argv"]


@pytest.mark.slow  # trains the quick mlp in a subprocess, about 20 s
def test_throughput_side_by_side_with_a_stand_in_reference(tmp_path):
    """A stand-in bench.py reports 1000 images/s: the table and JSON give keras-local's
    median beside it and their ratio."""
    (tmp_path / "bench.py").write_text(
        "import json\nprint('BENCH_JSON ' + json.dumps({'img_per_s_compute_only': 1000.0}))\n")
    out = tmp_path / "side_by_side.json"
    stdout = run_script("throughput.py", "--quick", "--reference", str(tmp_path), "--rounds",
                        "1", "--modes", "predsim", "--json", str(out))
    assert "reference img/s  keras-local img/s   ratio" in stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["reference_images_per_s"] == [1000.0] and result["xla_resolved"] == "step"
    assert result["ratio"] == pytest.approx(result["keras_local_median"] / 1000.0)


def test_throughput_unknown_backend_step_fails_clearly(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick",
         "--backend", "nonsense"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_step_macs_count_heads_and_similarity():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from macs import count_step_macs
    finally:
        sys.path.pop(0)
    from keras_local.config import Config
    from keras_local.run.training import build_model

    local = build_model("mlp", (4, 4, 1), 10, Config(model="mlp", num_layers=1, num_hidden=8))
    backprop = build_model("mlp", (4, 4, 1), 10,
                           Config(model="mlp", num_layers=1, num_hidden=8, backprop=True))
    b = 2
    macs = count_step_macs(local, b)
    assert macs["encoders"] == b * 16 * 8 and macs["output"] == b * 8 * 10
    assert macs["heads"] == b * 8 * 10 + b * 8 * 8  # pred Dense + sim Dense
    assert macs["similarity"] == b * b * 8 + b * b * 10
    assert macs["step"] == (2 * macs["encoders"] + 3 * (macs["heads"] + macs["similarity"])
                            + 2 * macs["output"])
    plain = count_step_macs(backprop, b)
    assert plain["heads"] == plain["similarity"] == 0
    assert plain["step"] == 2 * plain["encoders"] + 3 * plain["output"]


@pytest.mark.slow  # see test_throughput_quick
def test_memory_quick(tmp_path):
    out = tmp_path / "memory.json"
    stdout = run_script("memory.py", "--quick", "--json", str(out))
    assert "model        conv layers  predsim MiB  backprop MiB  predsim/backprop" in stdout
    payload = json.loads(out.read_text())
    assert {"device", "method", "results", "summary", "xla"} <= set(payload)
    assert {(r["model"], r["mode"]) for r in payload["results"]} == {
        ("vgg8b", "predsim"), ("vgg8b", "backprop")}
    for result in payload["results"]:
        assert {"baseline_mib", "peak_mib", "peak_above_baseline_mib", "conv_layers"} <= set(
            result)
        assert result["peak_mib"] >= result["baseline_mib"] > 0
    assert payload["summary"][0]["conv_layers"] == 6


def test_memory_plot(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from memory import plot
    finally:
        sys.path.pop(0)
    results = [{"model": m, "mode": mode, "conv_layers": n, "peak_above_baseline_mib": v}
               for m, n in (("vgg8b", 6), ("vgg19", 16))
               for mode, v in (("predsim", 10.0), ("backprop", 20.0))]
    path = tmp_path / "memory.png"
    plot(results, str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a short training in a subprocess, then a second call that only reads it
def test_accuracy_recipe_trains_once_then_reads_the_run(tmp_path):
    # The demo data and one epoch stand in for the recipe's 200 epochs of Fashion-MNIST.
    args = ("--recipe", "fashion_mnist-mlp-predsim", "--seed", "3", "--save-dir",
            str(tmp_path / "runs"), "--out", str(tmp_path / "curves"),
            "--dataset", "fashion_mnist_demo", "--epochs", "1", "--max-train-examples", "256")
    stdout = run_script("accuracy.py", *args)
    assert "seed 3: keras-local-train --recipe fashion_mnist-mlp-predsim --seed 3" in stdout
    summary = json.loads((tmp_path / "curves.json").read_text())
    (row,) = summary["runs"]
    assert row["recipe"] == "fashion_mnist-mlp-predsim with changes: dataset, epochs"
    assert row["seed"] == 3 and row["epochs_done"] == 1 and row["finished"]
    assert 0 <= row["best_test_error"] <= row["final_test_error"] <= 100
    assert row["published_test_error"] is None  # the changed recipe is not the paper's run
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_script("accuracy.py", *args)
    assert f"finished in {row['run']}" in again
    assert len(os.listdir(tmp_path / "runs")) == 1


def test_accuracy_refuses_an_unknown_recipe():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accuracy.py"),
                           "--recipe", "fashion_mnist-mlp-nope"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "unknown recipe 'fashion_mnist-mlp-nope'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # builds, exports and times models in a subprocess, about 20 s idle
def test_inference_quick(tmp_path):
    out = tmp_path / "inference.json"
    stdout = run_script("inference.py", "--quick", "--json", str(out))
    assert "latency b=1 ms" in stdout and "img/s b=16" in stdout
    payload = json.loads(out.read_text())
    runners = {r["runner"] for r in payload["results"]}
    assert runners == {"onnxruntime", "keras predict", "keras predict_on_batch", "keras call"}
    assert {r["batch"] for r in payload["results"]} == {1, 16}
    assert all(r["median_ms"] > 0 for r in payload["results"])


@pytest.mark.slow
def test_scaling_quick_writes_its_table(tmp_path):
    out = tmp_path / "scaling.json"
    stdout = run_script("scaling.py", "--quick", "--json", str(out))
    assert "pipeline, 2 devices" in stdout and "vs one device" in stdout
    payload = json.loads(out.read_text())
    rows = {r["configuration"]: r for r in payload["results"]}
    assert set(rows) == {"one device", "mirrored, 2 devices", "pipeline, 2 devices",
                         "pipeline, 4 devices"}
    assert rows["one device"]["vs_one_device"] == 1.0
    assert all(r["images_per_s"] > 0 for r in rows.values()) and payload["cpu"]
    # one rate per timed window: the epochs of one fit (one data iterator)
    assert all(len(r["all"]) == payload["repeats"] for r in rows.values())


def test_tagged_json_reads_the_last_result_line_and_names_a_failure():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from common import tagged_json
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    done = subprocess.CompletedProcess(
        [], 0, stdout='log\nRESULT {"a": 1}\nRESULTS x\nRESULT {"a": 2}\n', stderr="")
    assert tagged_json(done, "RESULT", "row") == {"a": 2}
    crashed = subprocess.CompletedProcess([], -11, stdout="RESULTS {}\n",
                                          stderr="...Segmentation fault")
    with pytest.raises(RuntimeError, match=r"row 'mlp' failed \(exit -11\):\n\.\.\.Segmentation"):
        tagged_json(crashed, "RESULT", "row 'mlp'")
    printed_then_crashed = subprocess.CompletedProcess([], 1, stdout='RESULT {"a": 3}\n',
                                                       stderr="Traceback")
    assert tagged_json(printed_then_crashed, "RESULT", "row") == {"a": 3}
    with pytest.raises(RuntimeError, match=r"row failed \(exit 1\):\nTraceback"):
        tagged_json(printed_then_crashed, "RESULT", "row", require_exit_zero=True)


@pytest.mark.slow  # a benchmark subprocess, like the others here
def test_winograd_table_on_small_maps():
    stdout = run_script("winograd.py", "--shapes", "4x3", "6x2", "--batch", "2",
                        "--repeats", "1")
    rows = [line.split() for line in stdout.splitlines()
            if line.strip().startswith(("4x4", "6x6"))]
    assert [row[0] for row in rows] == ["4x4x3", "6x6x2"]
    assert all(float(row[-1]) < 1e-5 for row in rows)  # Winograd against direct


def test_winograd_rejects_a_bad_shape():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "winograd.py"),
                           "--shapes", "28by256"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--shapes: expected SIZExCHANNELS" in done.stderr


@pytest.mark.slow  # a fresh TensorFlow process that traces and runs a step, like the others
def test_startup_times_the_first_step_in_a_fresh_process(tmp_path):
    """A tiny mlp; --reference with a stand-in for the authors' bench.py, whose process
    wall time is the reference's time to its first step."""
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "bench.py").write_text(
        "import json, sys, time\ntime.sleep(0.5)\n"
        "print('BENCH_JSON ' + json.dumps({'argv': sys.argv}))\n")
    out = tmp_path / "startup.json"
    stdout = run_script("startup.py", "--models", "mlp", "--batch-size", "16", "--num-hidden",
                        "64", "--steps", "1", "--reference", str(reference), "--json", str(out))
    assert "time to the end of the first training step" in stdout and "load average" in stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["model"] == "mlp" and result["xla"] == "step"
    assert (0 < result["python"] < result["tensorflow"] <= result["keras_local"]
            <= result["built"] < result["first_step"])
    assert 0 < result["steady_step_seconds"] < result["first_step"]
    assert result["reference_first_step"] >= 0.5
    row = [line for line in stdout.splitlines() if line.startswith("mlp ")]
    assert len(row) == 1 and row[0].split()[-1].endswith("x")


@pytest.mark.slow  # see test_startup_times_the_first_step_in_a_fresh_process
def test_startup_times_another_xla_choice(tmp_path):
    """--xla none: the mlp's step (XLA-compiled whole by default) runs without XLA."""
    out = tmp_path / "startup.json"
    run_script("startup.py", "--models", "mlp", "--batch-size", "8", "--num-hidden", "16",
               "--steps", "1", "--xla", "none", "--json", str(out))
    (result,) = json.loads(out.read_text())["results"]
    assert result["xla"] == "none" and 0 < result["steady_step_seconds"] < result["first_step"]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "startup.py"),
                           "--xla", "all"], capture_output=True, text=True)
    assert done.returncode == 2 and "--xla: invalid choice: 'all'" in done.stderr


@pytest.mark.parametrize("script", ["throughput.py", "startup.py"])
def test_a_reference_without_bench_py_is_one_clear_error(tmp_path, script):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script),
                           "--reference", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no bench.py there" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # two fresh TensorFlow processes read a small pipeline
def test_input_pipeline_reads_every_augmented_image(tmp_path):
    out = tmp_path / "pipeline.json"
    stdout = run_script("input_pipeline.py", "--datasets", "fashion_mnist", "--examples", "300",
                        "--batch-size", "64", "--epochs", "2", "--train-images-per-second", "10",
                        "--json", str(out))
    (row,) = [line for line in stdout.splitlines() if line.startswith("| fashion_mnist")]
    assert "crop (pad 2), flip" in row and row.endswith("x |")
    with open(out) as stream:
        (result,) = json.load(stream)["results"]
    for setting, threads in (("one_core", 1), ("all_cores", "all")):
        measured = result[setting]
        assert measured["threads"] == threads
        assert measured["images"] == 300  # every example, the last batch partial
        assert len(measured["epoch_seconds"]) == 2 and measured["images_per_second"] > 0


def test_input_pipeline_refuses_a_bad_count():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "input_pipeline.py"),
                           "--examples", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--examples must be at least 1; got 0")
