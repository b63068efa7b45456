"""Scale-out (issue 6): strategies, layer-wise placement, pipelined training.

Multi-device checks run in fresh interpreters (tests/distribute_cases.py,
tests/multiworker_worker.py): logical CPU devices and multi-worker collectives must be
set up before TensorFlow runs its first op, which this pytest process already has.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import keras_local as kl
from keras_local.run import distribute
from keras_local.models.registry import build_feature_layers

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
CASE_TIMEOUT = 300


def child_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def run_case(case, data_path, work):
    """Run one tests/distribute_cases.py case; its measurements as a dict."""
    proc = subprocess.run(
        [sys.executable, os.path.join(TESTS_DIR, "distribute_cases.py"), case, str(data_path),
         str(work)], cwd=REPO_DIR, env=child_env(), capture_output=True, text=True,
        timeout=CASE_TIMEOUT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"case {case} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def data_path(fashion_mnist_small, tmp_path_factory):
    """The first 2,048 Fashion-MNIST training images, for the child processes."""
    (x, y), _ = fashion_mnist_small
    path = tmp_path_factory.mktemp("distribute_data") / "fashion_mnist_2048.npz"
    np.savez(path, x=x[:2048], y=y[:2048])
    return path


# ----------------------------------------------------------- in this process
def test_strategy_one_is_the_default_strategy():
    import tensorflow as tf

    strategy = distribute.make_strategy(kl.Config(strategy="one"))
    assert strategy is tf.distribute.get_strategy()
    assert strategy.num_replicas_in_sync == 1
    assert distribute.is_chief(strategy)
    assert distribute.per_worker_path("runs/x/backup", strategy) == "runs/x/backup"


def test_auto_resolves_from_tf_config_and_placement(monkeypatch):
    two = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
           "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(two))
    assert distribute.resolve_strategy(kl.Config(strategy="auto")) == "multiworker"
    assert distribute.resolve_strategy(kl.Config(strategy="auto", placement="layerwise")) == "one"
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.resolve_strategy(kl.Config(strategy="auto")) == "one"  # no GPUs here


@pytest.mark.parametrize("changes,message", [
    (dict(strategy="mirrored", placement="layerwise"), "placement 'layerwise'"),
    (dict(strategy="multiworker", placement="layerwise", pipeline=True), "placement 'layerwise'"),
    (dict(placement="layerwise", pipeline=True, backprop=True), "pipeline needs local losses"),
    (dict(placement="layerwise", pipeline=True, no_detach=True), "pipeline needs local losses"),
    (dict(strategy="multiworker"), "needs TF_CONFIG"),
    (dict(strategy="mirrored", backend="jax"), "need backend 'tensorflow'"),
])
def test_bad_combinations_raise_one_line_value_error(monkeypatch, changes, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match=message) as error:
        distribute.make_strategy(kl.Config(**changes))
    assert "\n" not in str(error.value)


def test_tf_config_workers():
    assert distribute.tf_config_workers({}) == 0
    cluster = {"cluster": {"chief": ["h:1"], "worker": ["h:2", "h:3"]}, "task": {}}
    assert distribute.tf_config_workers({"TF_CONFIG": json.dumps(cluster)}) == 3
    with pytest.raises(ValueError, match="TF_CONFIG must be a JSON object"):
        distribute.tf_config_workers({"TF_CONFIG": "not json"})


def test_layerwise_devices_put_block_i_on_device_i_mod_n():
    config = kl.Config(feat_mult=1 / 32, num_layers=1, num_hidden=8)
    layers = build_feature_layers("vgg8b", (32, 32, 3), 10, config)
    devices = ["/device:CPU:0", "/device:CPU:1", "/device:CPU:2"]
    per_block = distribute.block_devices(layers, devices)
    assert per_block == [devices[i % 3] for i in range(len(per_block))]
    per_layer, output_device = distribute.layerwise_devices(layers, devices)
    names = [layer.name for layer in layers]
    # vgg8b: block_1, block_2, pool_1, block_3, ... pool_4, flatten, block_7: a
    # parameter-free layer runs with the block it feeds.
    assert per_layer[names.index("pool_1")] == per_layer[names.index("block_3")]
    assert names[names.index("flatten") + 1] == "block_7"
    assert per_layer[names.index("flatten")] == per_layer[names.index("block_7")] == devices[0]
    assert output_device == per_block[-1]


def test_same_device():
    assert distribute.same_device("/device:CPU:1", "/job:localhost/replica:0/task:0/device:CPU:1")
    assert not distribute.same_device("/device:CPU:0", "/device:CPU:1")


# --------------------------------------------------- MirroredStrategy, 2 CPUs
# The case builds and traces ten models under the strategy: over 5 minutes on 2 busy
# cores, so its tests are slow (pytest -m slow). In the default run, training under a
# MirroredStrategy (one CPU replica) is covered by test_train_cli (train.py --strategy
# mirrored) and test_feedback (the feedback-alignment gradient under strategy.run).
@pytest.fixture(scope="module")
def mirrored(data_path, tmp_path_factory):
    return run_case("mirrored", data_path, tmp_path_factory.mktemp("mirrored"))


@pytest.mark.slow
def test_mirrored_step_equals_mean_of_single_device_steps(mirrored):
    """One mirrored SGD step on [a; b] == the mean of one-device steps on a and on b,
    BatchNorm in training mode with per-replica statistics."""
    assert mirrored["replicas"] == 2
    assert mirrored["moved"] > 1e-3
    assert mirrored["trainable_max_diff"] < 1e-5
    assert mirrored["moving_stats_max_diff"] < 1e-5
    assert mirrored["moving_mean_replica_copies_diff"] == 0.0


@pytest.mark.slow
def test_several_steps_per_execution_with_two_replicas_is_refused_in_one_line(mirrored):
    assert mirrored["steps_per_execution_error"] == (
        "steps_per_execution 4 needs one replica; this strategy has 2: use 1 (or 0, auto)")


@pytest.mark.slow
def test_locality_holds_under_mirrored_strategy(mirrored):
    assert mirrored["locality_block_1_diff"] == 0.0
    assert mirrored["locality_last_block_diff"] > 1e-5  # the altered heads did act


@pytest.mark.slow
def test_checkpoint_and_backup_and_restore_under_mirrored(mirrored):
    assert mirrored["checkpoint_max_diff"] == 0.0
    assert mirrored["checkpoint_predict_diff"] == 0.0
    assert mirrored["epochs_before_interruption"] == [0, 1]
    assert mirrored["epochs_after_restart"] == [2]
    assert mirrored["resumed_vs_straight_max_diff"] < 1e-6


# --------------------------------------------------------- pipelined, 2 CPUs
@pytest.fixture(scope="module")
def pipelined(data_path, tmp_path_factory):
    return run_case("pipeline", data_path, tmp_path_factory.mktemp("pipeline"))


def test_pipeline_blocks_live_on_their_assigned_devices(pipelined):
    assert pipelined["assigned"] == ["/device:CPU:0", "/device:CPU:1"] * 2
    assert pipelined["misplaced"] == []
    conds, expected = pipelined["pipeline_conds"]
    assert conds == expected
    assert pipelined["optimizer_slots_checked"] > 0
    for block, expected in zip(sorted(pipelined["block_variable_devices"]), pipelined["assigned"]):
        (device,) = pipelined["block_variable_devices"][block]
        assert device.endswith(expected.replace("/device:", "device:"))


def test_pipeline_fills_then_trains_every_block_at_every_step(pipelined):
    blocks = ["block_1", "block_2", "block_3", "block_4"]
    changed = pipelined["changed_per_step"]
    for step in range(len(blocks)):  # filling: stage k starts at step k
        assert changed[step] == blocks[:step + 1]
    for step in range(len(blocks), len(changed)):  # full steps: every block, and the output
        assert changed[step] == blocks + ["output"]


def test_pipeline_stages_that_skip_keep_their_weights_when_it_fills_again(pipelined):
    # After a restore the buffers are empty while Adam's moments are not: only block 1 trains.
    assert pipelined["changed_at_refill"] == ["block_1"]


def test_pipelined_stage_gated_updates_equal_keras_apply(pipelined):
    assert pipelined["gated_vs_apply_max_diff"] < 1e-6


def test_pipelined_updates_wait_for_no_gradients_of_other_stages(pipelined):
    assert pipelined["widest_identity_n"] < pipelined["trainable_variables"] / 2


def test_pipeline_local_losses_fall_on_fashion_mnist(pipelined):
    history = pipelined["history"]
    for k in range(1, 5):
        for name in (f"block_{k}_pred_loss", f"block_{k}_sim_loss"):
            assert history[name][-1] < 0.8 * history[name][0], (name, history[name])
    assert history["error"][-1] < 30.0


# ------------------------------------------- MultiWorkerMirroredStrategy, 2 workers
# Two worker processes per cluster: slow (pytest -m slow). The default run checks how
# TF_CONFIG resolves to the strategy (test_auto_resolves_from_tf_config_and_placement).
def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Cluster:
    """Two multiworker_worker.py processes on 127.0.0.1 sharing one TF_CONFIG cluster."""

    def __init__(self, data_path, backup_dir, epochs=3):
        self.workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
        self.data_path, self.backup_dir, self.epochs = data_path, backup_dir, epochs
        self.procs = {}

    def start(self, task, out, *extra):
        os.makedirs(out, exist_ok=True)
        tf_config = {"cluster": {"worker": self.workers}, "task": {"type": "worker", "index": task}}
        with open(os.path.join(out, f"log_{task}.txt"), "w") as log:  # the child keeps its copy
            self.procs[task] = subprocess.Popen(
                [sys.executable, os.path.join(TESTS_DIR, "multiworker_worker.py"),
                 "--data", str(self.data_path), "--out", str(out), "--epochs", str(self.epochs),
                 "--backup-dir", str(self.backup_dir), *extra],
                cwd=REPO_DIR, env=child_env(TF_CONFIG=json.dumps(tf_config)),
                stdout=log, stderr=subprocess.STDOUT)

    def wait(self, task, timeout=CASE_TIMEOUT):
        try:
            return self.procs[task].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise

    def kill(self, task):
        self.procs[task].kill()
        self.procs[task].wait()

    def kill_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def worker_log(out, task):
    with open(os.path.join(out, f"log_{task}.txt")) as f:
        return f.read()[-3000:]


def epochs_run(out, task):
    path = os.path.join(out, f"epochs_{task}.txt")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line) for line in f.read().split()]


def load_weights(out, task):
    return dict(np.load(os.path.join(out, f"weights_{task}.npz")))


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def multiworker_straight(tmp_path_factory):
    """An uninterrupted 3-epoch run of two workers on 256 random examples."""
    work = tmp_path_factory.mktemp("multiworker")
    rng = np.random.default_rng(0)
    data_path = work / "data.npz"
    np.savez(data_path, x=rng.normal(size=(256, 28, 28, 1)).astype("float32"),
             y=rng.integers(0, 10, 256).astype("int32"))
    cluster = Cluster(data_path, work / "backup")
    out = work / "straight"
    for task in (0, 1):
        cluster.start(task, out)
    codes = [cluster.wait(task) for task in (0, 1)]
    for task in (0, 1):
        assert codes[task] == 0, worker_log(out, task)
    chiefs = [pathlib.Path(os.path.join(out, f"chief_{task}.txt")).read_text() for task in (0, 1)]
    backups = sorted(os.listdir(work / "backup"))
    return {"data_path": data_path, "weights": [load_weights(out, task) for task in (0, 1)],
            "epochs": [epochs_run(out, task) for task in (0, 1)], "chiefs": chiefs,
            "backups": backups}


@pytest.mark.slow
def test_multiworker_workers_end_with_identical_weights(multiworker_straight):
    weights_0, weights_1 = multiworker_straight["weights"]
    assert multiworker_straight["epochs"] == [[1, 2, 3], [1, 2, 3]]
    assert multiworker_straight["chiefs"] == ["True", "False"]
    assert multiworker_straight["backups"] == ["worker_0", "worker_1"]
    assert max_diff(weights_0, weights_1) == 0.0
    assert any("moving_mean" in k for k in weights_0)  # BatchNorm statistics agree too


@pytest.mark.slow
def test_multiworker_killed_worker_restarts_from_backup(multiworker_straight, tmp_path):
    """Worker 1 is killed after epoch 1; MultiWorkerMirroredStrategy then fails the
    survivor (its collectives see a dead peer), as TensorFlow documents; the cluster is
    started again and both workers resume from their BackupAndRestore copies."""
    data_path, straight = multiworker_straight["data_path"], multiworker_straight["weights"]
    cluster = Cluster(data_path, tmp_path / "backup")
    first, second = tmp_path / "first", tmp_path / "second"
    cluster.start(0, first)
    cluster.start(1, first, "--pause-after-epoch", "1")
    deadline = time.time() + CASE_TIMEOUT
    while epochs_run(first, 1) != [1]:
        if time.time() > deadline or cluster.procs[1].poll() is not None:
            cluster.kill_all()
            pytest.fail("worker 1 never finished epoch 1:\n" + worker_log(first, 1))
        time.sleep(0.2)
    cluster.kill(1)
    try:  # the survivor notices the dead peer (heartbeats) and fails, or is stopped
        cluster.procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        cluster.kill(0)
    assert epochs_run(first, 0) == [1]

    for task in (0, 1):
        cluster.start(task, second)
    codes = [cluster.wait(task) for task in (0, 1)]
    for task in (0, 1):
        assert codes[task] == 0, worker_log(second, task)
        assert epochs_run(second, task) == [2, 3]  # resumed after the backed-up epoch
    resumed = [load_weights(second, task) for task in (0, 1)]
    assert max_diff(resumed[0], resumed[1]) == 0.0
    assert max_diff(resumed[0], straight[0]) < 1e-5
