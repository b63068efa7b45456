import numpy as np
import pytest
import keras

import keras_local as kl

from helpers import fashion_mnist_mlp_error, weights_by_path


def small_config(**changes):
    base = dict(num_layers=3, num_hidden=16, dropout=0.0, optim="sgd", lr=0.1, jit_compile=False)
    base.update(changes)
    return kl.Config(**base)


def batch(rng, n=8, shape=(6, 6, 1), classes=4):
    return rng.normal(size=(n,) + shape).astype("float32"), rng.integers(0, classes, n).astype("int32")


def train_once_with_altered_later_heads(config, rng, name="mlp", shape=(6, 6, 1)):
    """One SGD step on two copies of a model that differ only in the heads of the
    last block; returns both models' weights after the step."""
    x, y = batch(rng, shape=shape)
    results = []
    for alter in (False, True):
        keras.utils.set_random_seed(3)
        model = kl.build_model(name, shape, 4, config)
        if alter:
            for head in model.local_blocks[-1].heads.values():
                for v in head.trainable_weights:
                    v.assign(np.random.default_rng(7).normal(size=v.shape).astype("float32"))
        model.compile()
        model.train_on_batch(x, y)
        results.append(weights_by_path(model))
    return results


def block_weights(weights, block_name):
    return {p: w for p, w in weights.items()
            if p.startswith(block_name + "/") and "head" not in p}


@pytest.mark.parametrize("name,shape", [("mlp", (6, 6, 1)), ("vgg6a", (8, 8, 3))])
def test_no_gradient_crosses_a_block_boundary(rng, name, shape):
    config = small_config(feat_mult=1 / 32) if name != "mlp" else small_config()
    plain, altered = train_once_with_altered_later_heads(config, rng, name, shape)
    first = kl.build_model(name, shape, 4, config).local_blocks[0].name
    before = block_weights(weights_by_path(kl.build_model(name, shape, 4, config)), first)
    after = block_weights(plain, first)
    assert any(not np.allclose(before[p], after[p]) for p in after), "block 1 did not train"
    for path, value in block_weights(plain, first).items():
        np.testing.assert_array_equal(value, altered[path], err_msg=path)


def test_no_detach_lets_gradients_cross_blocks(rng):
    plain, altered = train_once_with_altered_later_heads(small_config(no_detach=True), rng)
    kernel = "block_1/block_1_encoder/kernel"
    assert np.abs(plain[kernel] - altered[kernel]).max() > 1e-6


@pytest.mark.tensorflow_only
def test_block_gradient_of_later_loss_is_zero(rng):
    """The train step's tapes: block 2's loss has no gradient path to block 1."""
    import tensorflow as tf

    model = kl.build_model("mlp", (6, 6, 1), 4, small_config())
    x, y = batch(rng)
    onehot = keras.ops.one_hot(y, 4)
    with tf.GradientTape() as tape:
        h = model.feature_layers[0](x)
        h = model.local_blocks[0](h, training=True)
        h = tf.stop_gradient(h)  # what the train step does between blocks
        model.local_blocks[1](h, training=True, labels=onehot)
        loss = model.local_blocks[1].losses[0]
    grads = tape.gradient(loss, model.local_blocks[0].trainable_variables)
    assert float(loss) > 0
    assert all(g is None or float(tf.reduce_max(tf.abs(g))) == 0.0 for g in grads)


def test_backprop_mode_has_no_heads():
    model = kl.build_model("vgg6a", (8, 8, 3), 4, small_config(backprop=True, feat_mult=1 / 32))
    assert not any("head" in v.path or "projection" in v.path for v in model.weights)
    assert len(model.weights) == len(model.inference_model().weights)
    assert all(not block.heads for block in model.local_blocks)


def test_local_output_layer_starts_at_zero():
    model = kl.build_model("mlp", (6, 6, 1), 4, small_config())
    assert not np.any(model.output_layer.kernel.numpy())
    for block in model.local_blocks:
        assert not np.any(block.heads["pred"].dense.kernel.numpy())


@pytest.mark.parametrize("mode", ["pred", "sim", "predsim", "backprop", "no_detach"])
def test_every_mode_trains_and_reports_metrics(rng, mode):
    changes = {"backprop": True} if mode == "backprop" else (
        {"no_detach": True} if mode == "no_detach" else {"loss_sup": mode})
    model = kl.build_model("mlp", (6, 6, 1), 4, small_config(dropout=0.1, **changes))
    model.compile()
    x, y = batch(rng, n=32)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    assert np.isfinite(logs["loss"]) and 0 <= logs["error"] <= 100
    if mode in ("pred", "predsim", "no_detach"):
        assert "block_3_pred_loss" in logs and "block_3_error" in logs
    if mode in ("sim", "predsim", "no_detach"):
        assert "block_2_sim_loss" in logs
    if mode == "backprop":
        assert not any(k.startswith("block_") for k in logs)


def test_inference_model_matches_trained_model(rng):
    model = kl.build_model("vgg6a", (8, 8, 3), 4,
                           small_config(feat_mult=1 / 32, dropout=0.2, optim="adam", lr=1e-2))
    model.compile()
    x, y = batch(rng, n=32, shape=(8, 8, 3))
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    bn = model.local_blocks[0].bn
    assert not np.allclose(bn.moving_mean.numpy(), 0.0), "BN statistics never moved"
    plain = model.inference_model()
    assert not any("head" in v.path or "dropout" in v.path for v in plain.weights)
    np.testing.assert_allclose(plain.predict(x, verbose=0),
                               keras.ops.convert_to_numpy(model(x, training=False)), atol=1e-5)


def test_weight_decay_adds_l2_to_the_gradient(rng):
    x, y = batch(rng)
    outcomes = []
    for decay in (0.0, 0.5):
        keras.utils.set_random_seed(3)
        model = kl.build_model("mlp", (6, 6, 1), 4, small_config(weight_decay=decay, lr=0.1))
        before = weights_by_path(model)
        model.compile()
        model.train_on_batch(x, y)
        outcomes.append((before, weights_by_path(model)))
    kernel = "block_1/block_1_encoder/kernel"
    (b0, a0), (b1, a1) = outcomes
    np.testing.assert_allclose(a1[kernel] - a0[kernel], -0.1 * 0.5 * b0[kernel], atol=1e-6)


def test_steps_per_execution_auto_is_one_unless_pipelined_and_reaches_compile():
    assert kl.Config().resolved_steps_per_execution == 1
    pipelined = kl.Config(model="mlp", placement="layerwise", pipeline=True)
    assert pipelined.resolved_steps_per_execution == 16
    assert pipelined.replace(steps_per_execution=3).resolved_steps_per_execution == 3
    model = kl.build_model("mlp", (6, 6, 1), 4, small_config().replace(steps_per_execution=5))
    model.compile()
    assert model.steps_per_execution == 5


def test_milestone_schedule():
    config = kl.Config(lr=1.0, lr_decay_milestones=(2, 4), lr_decay_fact=0.25)
    rates = [kl.milestone_learning_rate(config, epoch) for epoch in range(6)]
    assert rates == [1.0, 1.0, 0.25, 0.25, 0.0625, 0.0625]


def test_save_and_load_round_trip(tmp_path, rng):
    model = kl.build_model("mlp", (6, 6, 1), 4, small_config())
    model.compile()
    x, y = batch(rng)
    model.train_on_batch(x, y)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = kl.load_model(path)
    assert isinstance(loaded, kl.LocalModel)
    assert loaded.config.network_dict() == model.config.network_dict()  # the run part stays out
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), atol=1e-6)


@pytest.mark.parametrize("bad,message", [
    (dict(loss_sup="simpred"), "unknown loss_sup 'simpred'; choose one of pred, sim, predsim"),
    (dict(optim="rmsprop"), "unknown optim 'rmsprop'; choose one of adam, amsgrad, sgd"),
    (dict(nonlin="tanh"), "unknown nonlin 'tanh'"),
    (dict(beta=1.5), "beta must be in"),
    (dict(backprop=True, no_detach=True), "exclusive"),
    (dict(steps_per_execution=-1), r"steps_per_execution must be >= 0 \(0 = auto\), got -1"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        kl.Config(**bad)


# Two 3x1024 MLPs, 2 epochs each: nearly 3 minutes on 2 busy cores, so slow (pytest -m
# slow). The default run keeps learning on real images in test_feedback (bio predsim
# MLP), test_train_cli (train.py end to end) and test_distribute (pipelined MLP).
@pytest.mark.slow
def test_fashion_mnist_predsim_mlp_learns(fashion_mnist_small):
    """The paper's mlp recipe options (docs/method.md section 10), 2 epochs on the 8,000
    demo images: under 20% test error."""
    errors = {backprop: fashion_mnist_mlp_error(fashion_mnist_small, backprop=backprop)
              for backprop in (False, True)}
    assert errors[False] < 20.0
    assert errors[True] < 25.0


@pytest.mark.parametrize("name,shape", [("mlp", (6, 6, 1)), ("vgg8b", (28, 28, 1))])
def test_first_step_is_traced_without_creating_variables(rng, name, shape):
    """A tf.function that creates variables while traced is traced again (variable
    creation forbidden): the optimiser must be built before fit traces its step, or the
    first step pays the tracing twice."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.function tracing is TensorFlow's")
    import tensorflow as tf

    config = kl.Config(num_layers=2, num_hidden=16, feat_mult=0.0625, batch_size=8)
    model = kl.build_model(name, shape, 4, config)
    model.compile()
    created_while_tracing = []

    def creator(next_creator, **kwargs):
        if tf.inside_function():
            created_while_tracing.append(kwargs.get("name"))
        return next_creator(**kwargs)

    x, y = batch(rng, n=16, shape=shape)
    with tf.variable_creator_scope(creator):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        model.evaluate(x, y, batch_size=8, verbose=0)
    assert model.optimizer.built
    assert created_while_tracing == []
