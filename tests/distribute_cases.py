"""Multi-device checks that need their own process, for tests/test_distribute.py.

Logical CPU devices must be configured before TensorFlow runs its first op, which the
pytest process has long done; so each case runs here, in a fresh interpreter:

    python tests/distribute_cases.py CASE DATA.npz WORK_DIR

and prints one JSON line of measurements that the test asserts on. CASE is "mirrored"
(2 replicas: equivalence, locality, checkpoints, BackupAndRestore) or "pipeline"
(layerwise placement over 2 devices, pipelined training on real Fashion-MNIST).
"""

import json
import os
import sys

from helpers import weights_by_path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def use_logical_cpus(count):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])


def max_diff(a, b, keys=None):
    import numpy as np

    keys = sorted(a) if keys is None else keys
    return max(float(np.abs(a[k] - b[k]).max()) for k in keys)


def one_step(model, x, y):
    """One train step on the batch (x, y), split over the replicas.

    ``fit`` splits each global batch into consecutive per-replica slices; Keras's
    ``train_on_batch`` would instead give every replica the whole batch.
    """
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)


# ------------------------------------------------------------------- mirrored
def mirrored_case(data, work):
    use_logical_cpus(2)
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_local as kl
    from keras_local.run.distribute import make_strategy

    config = kl.Config(model="mlp", num_layers=3, num_hidden=32, optim="sgd", lr=0.1,
                       jit_compile=False, strategy="mirrored")
    strategy = make_strategy(config)
    shape = data["x"].shape[1:]
    a, b = slice(0, 32), slice(32, 64)
    xa, ya, xb, yb = data["x"][a], data["y"][a], data["x"][b], data["y"][b]
    result = {"replicas": strategy.num_replicas_in_sync}

    def build(scope, cfg=config):
        with scope:
            model = kl.build_model("mlp", shape, 10, cfg)
            model.compile()
        return model

    keras.utils.set_random_seed(3)
    reference = build(tf.distribute.get_strategy().scope())
    initial, initial_by_path = reference.get_weights(), weights_by_path(reference)

    # Several steps per execution with 2 replicas: refused at compile, in one line.
    try:
        build(strategy.scope(), config.replace(steps_per_execution=4))
        result["steps_per_execution_error"] = None
    except ValueError as error:
        result["steps_per_execution_error"] = str(error)

    # (a) one mirrored step on [a; b] == mean of the single-device steps on a and on b.
    mirrored = build(strategy.scope())
    mirrored.set_weights(initial)
    one_step(mirrored, np.concatenate([xa, xb]), np.concatenate([ya, yb]))
    singles = []
    for x, y in ((xa, ya), (xb, yb)):
        single = build(tf.distribute.get_strategy().scope(), config.replace(strategy="one"))
        single.set_weights(initial)
        one_step(single, x, y)
        singles.append(weights_by_path(single))
    expected = {k: (singles[0][k] + singles[1][k]) / 2 for k in singles[0]}
    got = weights_by_path(mirrored)
    moving = [k for k in got if "moving_" in k]
    trainable = [k for k in got if k not in moving]
    result["trainable_max_diff"] = max_diff(got, expected, trainable)
    result["moving_stats_max_diff"] = max_diff(got, expected, moving)
    result["moved"] = max_diff(got, initial_by_path, trainable)
    first_bn = mirrored.local_blocks[0].bn.moving_mean.value
    copies = strategy.experimental_local_results(first_bn)
    result["moving_mean_replica_copies_diff"] = float(np.abs(copies[0] - copies[1]).max())

    # Locality under the strategy: altering the last block's heads leaves block 1's
    # update unchanged.
    outcomes = []
    for alter in (False, True):
        model = build(strategy.scope())
        model.set_weights(initial)
        if alter:
            for head in model.local_blocks[-1].heads.values():
                for v in head.trainable_weights:
                    v.assign(np.random.default_rng(7).normal(size=v.shape).astype("float32"))
        one_step(model, np.concatenate([xa, xb]), np.concatenate([ya, yb]))
        outcomes.append(weights_by_path(model))
    block_1 = [k for k in outcomes[0] if k.startswith("block_1/") and "head" not in k]
    last = mirrored.local_blocks[-1].name
    last_encoder = [k for k in outcomes[0] if k.startswith(f"{last}/") and "head" not in k]
    result["locality_block_1_diff"] = max_diff(outcomes[0], outcomes[1], block_1)
    result["locality_last_block_diff"] = max_diff(outcomes[0], outcomes[1], last_encoder)

    # Checkpoints: save_weights / load_weights round trip between mirrored models.
    path = os.path.join(work, "mirrored.weights.h5")
    mirrored.save_weights(path)
    restored = build(strategy.scope())
    restored.load_weights(path)
    result["checkpoint_max_diff"] = max_diff(weights_by_path(restored), got)
    x_eval = data["x"][:64]
    result["checkpoint_predict_diff"] = float(np.abs(
        restored.predict(x_eval, verbose=0) - mirrored.predict(x_eval, verbose=0)).max())

    # BackupAndRestore: interrupted after epoch 2 of 3 and resumed == uninterrupted.
    adam = config.replace(optim="adam", lr=1e-3)
    fit_data = (data["x"][:256], data["y"][:256])

    def fit(model, backup_dir, interrupt_after=None):
        epochs = []

        class Record(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                epochs.append(epoch)

            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 == interrupt_after:
                    raise RuntimeError("simulated preemption")

        callbacks = [keras.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False),
                     Record()]
        try:
            model.fit(*fit_data, batch_size=64, epochs=3, shuffle=False, verbose=0,
                      callbacks=callbacks)
        except RuntimeError:
            pass
        return epochs

    straight = build(strategy.scope(), adam)
    straight.set_weights(initial)
    fit(straight, os.path.join(work, "backup_straight"))
    interrupted = build(strategy.scope(), adam)
    interrupted.set_weights(initial)
    backup = os.path.join(work, "backup")
    result["epochs_before_interruption"] = fit(interrupted, backup, interrupt_after=2)
    resumed = build(strategy.scope(), adam)  # fresh weights: the backup must restore them
    result["epochs_after_restart"] = fit(resumed, backup)
    result["resumed_vs_straight_max_diff"] = max_diff(weights_by_path(resumed), weights_by_path(straight))
    return result


# ------------------------------------------------------------------- pipeline
def pipeline_case(data, work):
    use_logical_cpus(2)
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_local as kl
    from keras_local.run.distribute import block_devices, same_device

    config = kl.Config(model="mlp", num_layers=4, num_hidden=128, optim="adam", lr=1e-3,
                       jit_compile=False, placement="layerwise", pipeline=True)
    keras.utils.set_random_seed(1)
    model = kl.build_model("mlp", data["x"].shape[1:], 10, config)
    model.compile()
    result = {"devices": [d.name for d in tf.config.list_logical_devices("CPU")]}

    # Placement: every block variable (and its optimiser slots, built by compile, its
    # metrics and the buffer that feeds it) on the block's assigned device.
    assigned = block_devices(model)
    result["assigned"] = assigned
    misplaced, slots_checked = [], 0
    for block, device in zip(model.local_blocks, assigned):
        metric_variables = [v for metric in block.local_metrics.values() for v in metric.variables]
        assert metric_variables
        for v in block.weights + metric_variables:
            if not same_device(v.value.device, device):
                misplaced.append(f"{v.path} on {v.value.device}, assigned {device}")
        for v in block.trainable_weights:
            for slot in model.optimizer.variables:
                if slot.path.startswith("adam/" + v.path.replace("/", "_") + "_"):
                    slots_checked += 1
                    if not same_device(slot.value.device, device):
                        misplaced.append(f"{slot.path} on {slot.value.device}")
    for boundary, stage in zip(model.pipeline_buffers.boundaries, model.pipeline_buffers.stages[1:]):
        if not same_device(boundary.activations.device, stage.device):
            misplaced.append(f"{boundary.activations.name} on {boundary.activations.device}")
    result["optimizer_slots_checked"] = slots_checked
    result["block_variable_devices"] = {
        block.name: sorted({v.value.device for v in block.weights}) for block in model.local_blocks}

    # The optimiser update: no op gathers the gradients of every stage (Keras's replica
    # sum under the default strategy was such a barrier before the update).
    step = tf.function(lambda x, y: model.train_step((x, y))).get_concrete_function(
        tf.TensorSpec((None,) + data["x"].shape[1:]), tf.TensorSpec((None,), "int32"))
    result["widest_identity_n"] = max(
        [len(op.inputs) for op in step.graph.get_operations() if op.type == "IdentityN"],
        default=0)
    result["trainable_variables"] = len(model.trainable_variables)
    # Each stage's conditionals (skip while the pipeline fills: its gradients, then its
    # updates) on the stage's device, so that their inputs and outputs (the gradients,
    # the step counter) are not sent to another device and back; the output metrics' one
    # on the output stage's.
    conds = [op for op in step.graph.get_operations() if op.type in ("If", "StatelessIf")]
    waiting_stages = model.pipeline_buffers.stages[1:]
    expected = waiting_stages + waiting_stages + waiting_stages[-1:]
    result["pipeline_conds"] = [len(conds), len(expected)]
    for op, stage in zip(conds, expected):
        if not (op.device and same_device(op.device, stage.device)):
            misplaced.append(f"{op.name} (stage {stage.name}) on {op.device or 'no device'}")
    result["misplaced"] = misplaced

    # Which blocks' weights change at each of the first steps.
    groups = {block.name: block.trainable_weights for block in model.local_blocks}
    groups["output"] = model.output_layer.trainable_weights
    x, y = data["x"], data["y"]
    changed = []
    for step in range(len(model.local_blocks) + 3):
        before = {name: [v.numpy().copy() for v in vs] for name, vs in groups.items()}
        batch = slice(step * 128, (step + 1) * 128)
        model.train_on_batch(x[batch], y[batch])
        changed.append(sorted(name for name, vs in groups.items()
                              if any(not np.array_equal(b, v.numpy())
                                     for b, v in zip(before[name], vs))))
    result["changed_per_step"] = changed
    result["stages"] = len(model.pipeline_buffers.stages)

    # Filling again (as after a restore), with Adam's moments no longer zero: the stages
    # that skip their work keep their weights.
    model.pipeline_buffers.reset()
    before = {name: [v.numpy().copy() for v in vs] for name, vs in groups.items()}
    model.train_on_batch(x[:128], y[:128])
    result["changed_at_refill"] = sorted(
        name for name, vs in groups.items()
        if any(not np.array_equal(b, v.numpy()) for b, v in zip(before[name], vs)))

    # The stage-gated updates equal Keras's optimiser apply (every stage valid: full again).
    from keras_local.steps import pipeline

    for _ in range(len(model.local_blocks)):
        model.train_on_batch(x[:128], y[:128])
    reference = kl.build_model("mlp", data["x"].shape[1:], 10, config)
    reference.compile()
    reference.set_weights(model.get_weights())
    reference.optimizer.build(reference.trainable_variables)
    for mine, theirs in zip(model.optimizer.variables, reference.optimizer.variables):
        theirs.assign(mine)
    for model_k in (model, reference):
        for boundary, source in zip(model_k.pipeline_buffers.boundaries,
                                    model.pipeline_buffers.boundaries):
            boundary.write(source.activations, source.labels, source.valid)
    gated = pipeline.gated_updates_apply
    pipeline.gated_updates_apply = lambda optimizer: False  # Keras's apply for reference
    try:
        reference.train_on_batch(x[:128], y[:128])
    finally:
        pipeline.gated_updates_apply = gated
    model.train_on_batch(x[:128], y[:128])
    result["gated_vs_apply_max_diff"] = max(
        float(np.max(np.abs(a.numpy() - b.numpy())))
        for a, b in zip(model.trainable_variables, reference.trainable_variables))

    # Local losses on real data, epoch by epoch.
    history = model.fit(x, y, batch_size=128, epochs=3, shuffle=False, verbose=0)
    result["history"] = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    return result


CASES = {"mirrored": mirrored_case, "pipeline": pipeline_case}


def main():
    case, data_path, work = sys.argv[1:4]
    import numpy as np

    data = dict(np.load(data_path))
    print("RESULT " + json.dumps(CASES[case](data, work)), flush=True)


if __name__ == "__main__":
    main()
