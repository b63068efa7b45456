"""A quiet start (keras_local/run/quiet.py): TensorFlow's C++ start-up noise is filtered out of
file descriptor 2, everything else written there still shows."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE_LINES = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1795804764.523018   16992 cudart_stub.cc:31] Could not find cuda drivers "
    b"on your machine, GPU will not be used.\n",
    b"E0000 00:00:1795804850.053068   17511 cuda_platform.cc:52] failed call to cuInit: "
    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n",
]


FILTER_SCRIPT = """
import importlib.util, os, sys, warnings
spec = importlib.util.spec_from_file_location("quiet", sys.argv[1])
quiet = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quiet)
with quiet.filtered_stderr(quiet.NOISE):
    for line in sys.argv[2:]:
        os.write(2, line.encode() + b"\\n")
    os.write(2, b"E0000 00:00:1.0   1 some_kernel.cc:12] a real error\\n")
    print("python stderr", file=sys.stderr)
    warnings.warn_explicit("a genuine warning", UserWarning, "module.py", 7)
print("stdout untouched")
"""


def test_filter_drops_the_known_noise_and_replays_the_rest():
    # A child process without pytest's capture, so that sys.stderr writes to fd 2; it loads
    # quiet.py alone (no TensorFlow import).
    result = subprocess.run(
        [sys.executable, "-c", FILTER_SCRIPT,
         os.path.join(ROOT, "keras_local", "run", "quiet.py"),
         *(line.decode().rstrip("\n") for line in NOISE_LINES)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "stdout untouched\n"
    assert result.stderr.splitlines() == [
        "E0000 00:00:1.0   1 some_kernel.cc:12] a real error", "python stderr",
        "module.py:7: UserWarning: a genuine warning"]


def test_train_cli_start_is_quiet_and_ends_with_a_summary(tmp_path):
    """The issue's check: a fresh user's demo run prints no E0000, cuInit or absl line."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "fashion_mnist_demo",
         "--model", "mlp", "--epochs", "1", "--max-train-examples", "256", "--num-hidden", "32",
         "--num-layers", "1", "--no-jit", "--no-export", "--similarity-examples", "16",
         "--save-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (result.stdout + result.stderr).splitlines()
    noisy = [line for line in lines if any(word in line for word in ("E0000", "cuInit", "absl"))]
    assert not noisy, noisy
    assert any(line.startswith("done: mlp predsim on fashion_mnist_demo, 1 epoch,")
               for line in lines)
    assert any(line.strip().startswith("tensorboard --logdir ") for line in lines)


def test_xla_cache_goes_into_a_folder_per_tensorflow_version_and_cpu(tmp_path, monkeypatch):
    from keras_local.run.quiet import use_xla_cache

    monkeypatch.setenv("TF_XLA_FLAGS", "")  # restored (unset) afterwards
    target = use_xla_cache(str(tmp_path / "cache"))
    assert os.path.isdir(target) and os.path.dirname(target) == str(tmp_path / "cache")
    assert os.path.basename(target).startswith("tensorflow-2.")
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_persistent_cache_directory={target}"
    assert use_xla_cache(str(tmp_path / "other")) is None  # already set: the first one holds


def test_xla_cache_steps_aside_where_it_cannot_work(tmp_path, monkeypatch):
    from keras_local.run.quiet import use_xla_cache

    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    assert use_xla_cache("none") is None
    assert use_xla_cache(None) is None
    assert use_xla_cache(str(tmp_path / "with space")) is None  # TF_XLA_FLAGS splits on spaces
    assert use_xla_cache(str(blocker / "inside")) is None  # cannot be created: no cache
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_auto_jit=0"  # left as the user set it
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_persistent_cache_directory=/elsewhere")
    assert use_xla_cache(str(tmp_path / "cache")) is None  # the user's own setting wins
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow  # two training processes
def test_a_second_run_loads_the_programs_the_first_compiled(tmp_path):
    cache = tmp_path / "xla"
    command = [sys.executable, "train.py", "--dataset", "fashion_mnist_demo", "--model", "mlp",
               "--epochs", "1", "--max-train-examples", "256", "--xla-cache", str(cache)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_XLA_FLAGS", None)
    first = subprocess.run(command + ["--save-dir", str(tmp_path / "a")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    (folder,) = cache.iterdir()
    compiled = sorted(path.name for path in folder.iterdir())
    assert compiled and all(name.endswith(".pb") for name in compiled)  # the mlp's XLA step
    second = subprocess.run(command + ["--save-dir", str(tmp_path / "b")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert sorted(path.name for path in folder.iterdir()) == compiled  # loaded, none new


LIVE_FILTER_SCRIPT = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("quiet", sys.argv[1])
quiet = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quiet)
with quiet.live_filtered_stderr(quiet.XLA_CACHE_NOISE):
    os.write(2, b"before\\n")
    os.write(2, sys.argv[2].encode() + b"\\n")
    os.write(2, b"E0000 00:00:1.0   1 some_kernel.cc:12] a real error\\n")
    os.write(2, b"Epoch 1/2 ")  # no newline yet: shows at once, not at the end
    time.sleep(0.5)
    print("python stderr", file=sys.stderr)
os.write(2, b"after\\n")
"""
CACHE_NOISE_LINE = ("E0000 00:00:1796655031.942260   25174 text_format.cc:378] Error parsing "
                    "text-format tensorflow.XlaSerializedCacheEntry: 2:1: Expected identifier, "
                    "got: 5")


def test_live_filter_drops_the_xla_cache_noise_and_passes_the_rest_at_once():
    result = subprocess.run(
        [sys.executable, "-c", LIVE_FILTER_SCRIPT,
         os.path.join(ROOT, "keras_local", "run", "quiet.py"), CACHE_NOISE_LINE],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "before", "E0000 00:00:1.0   1 some_kernel.cc:12] a real error",
        "Epoch 1/2 python stderr", "after"]


def test_a_run_on_a_warm_xla_cache_prints_no_cache_errors(tmp_path):
    """TensorFlow logs an ERROR line for every program it loads from the XLA cache (it tries
    the binary entry as text first); the second run of the same network loads them all."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("TF_CPP_MIN_LOG_LEVEL", "TF_XLA_FLAGS")}
    cache = tmp_path / "xla"

    def run(name):
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "fashion_mnist_demo",
             "--model", "mlp", "--epochs", "1", "--max-train-examples", "256",
             "--num-hidden", "32", "--num-layers", "1", "--xla-cache", str(cache),
             "--save-dir", str(tmp_path / name)],
            capture_output=True, text=True, timeout=300, env=env)

    first = run("first")
    assert first.returncode == 0, first.stderr[-2000:]
    assert any(files for _, _, files in os.walk(cache)), "the first run cached no program"
    second = run("second")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "XlaSerializedCacheEntry" not in second.stderr, second.stderr[-2000:]
    assert "E0000" not in second.stderr + second.stdout
