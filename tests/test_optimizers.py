"""PyTorch's Adam / AMSGrad / SGD as Keras optimisers, against NumPy implementations of
the torch.optim formulas (torch 2.x ``_single_tensor_adam`` / ``_single_tensor_sgd``)."""

import keras
import numpy as np
import pytest

import keras_local as kl
from keras_local import optimizers
from keras_local.optimizers import TorchAdam, TorchSGD

from helpers import to_numpy


def torch_adam(w, grads, lr, beta_1=0.9, beta_2=0.999, eps=1e-8, weight_decay=0.0,
               amsgrad=False, lrs=None):
    """NumPy (float64) torch.optim.Adam over a sequence of gradients; returns w."""
    w = w.astype(np.float64)
    m, v, v_max = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        lr_t = lr if lrs is None else lrs[t - 1]
        g = g + weight_decay * w
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        if amsgrad:
            v_max = np.maximum(v_max, v)
        denom = np.sqrt(v_max if amsgrad else v) / np.sqrt(1 - beta_2**t) + eps
        w = w - lr_t / (1 - beta_1**t) * m / denom
    return w


def torch_sgd(w, grads, lrs, momentum, weight_decay):
    w = w.astype(np.float64)
    buf = None
    for lr, g in zip(lrs, grads):
        g = g + weight_decay * w
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = buf
        w = w - lr * g
    return w


def keras_steps(optimizer, w, grads, lrs=None):
    variable = keras.Variable(w.astype("float32"))
    for t, g in enumerate(grads):
        if lrs is not None:
            optimizer.learning_rate = lrs[t]
        optimizer.apply([keras.ops.convert_to_tensor(g.astype("float32"))], [variable])
    return to_numpy(variable)


def assert_float32_close(got, want, steps):
    """Equal up to float32 rounding: one ulp of the weight per step and one more."""
    ulps = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    excess = np.abs(got - want) - (steps + 1) * ulps
    assert excess.max() <= 0, f"off by {np.abs(got - want).max():.3g}"


def draws(rng, steps, shape=(5, 7)):
    """Start weights and gradients whose size falls (so AMSGrad's max differs from v)
    and that include tiny entries (where epsilon's placement matters most)."""
    w = rng.normal(size=shape)
    grads = [rng.normal(size=shape) * 10.0 ** -k for k in range(steps)]
    grads[0][0, :3] = [1e-7, -3e-8, 0.0]
    return w, grads


@pytest.fixture(params=["fused", "ops"])
def update_path(request, monkeypatch):
    """Both implementations of the updates: on TensorFlow the fused XLA kernels
    (keras_local.kernels.tensorflow.fused_updates) and the backend-agnostic ops every other backend runs."""
    if request.param == "fused":
        if keras.backend.backend() != "tensorflow":
            pytest.skip("the fused kernels are TensorFlow's")
    else:
        monkeypatch.setattr(optimizers, "_fused_kernels", lambda *variables: None)
    return request.param


@pytest.mark.tensorflow_only
def test_tensorflow_updates_take_the_fused_kernels_unless_a_strategy_is_active():
    import tensorflow as tf

    variable = keras.Variable(np.zeros((2, 2), "float32"))
    kernels, (resolved,) = optimizers._fused_kernels(variable)
    assert isinstance(resolved, tf.Variable) and kernels.__name__.endswith(".fused_updates")
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        assert optimizers._fused_kernels(keras.Variable(np.zeros((2, 2), "float32"))) is None


@pytest.mark.tensorflow_only
def test_with_a_gpu_present_the_updates_take_the_plain_ops(monkeypatch):
    """The fused kernels were measured on CPUs only."""
    import tensorflow as tf

    variable = keras.Variable(np.zeros((2, 2), "float32"))
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["/physical_device:GPU:0"] if kind == "GPU"
                        else real(kind))
    assert optimizers._fused_kernels(variable) is None


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("steps", [1, 4])
def test_adam_matches_pytorch_formula(rng, amsgrad, weight_decay, steps, update_path):
    w, grads = draws(rng, steps)
    optimizer = TorchAdam(learning_rate=1e-3, amsgrad=amsgrad,
                          coupled_weight_decay=weight_decay)
    got = keras_steps(optimizer, w, grads)
    want = torch_adam(w, grads, 1e-3, amsgrad=amsgrad, weight_decay=weight_decay)
    assert_float32_close(got, want, steps)
    assert np.abs(got - w).max() > 1e-4  # the step did move the weights


def test_adam_update_at_a_given_step_uses_that_step_and_leaves_the_counter(rng, update_path):
    """``update_step_at`` (the pipelined step reads the counter once per stage): fresh
    moments updated as step t = 3, by torch's formula at t = 3."""
    w, (g,) = draws(rng, 1)
    optimizer = TorchAdam(learning_rate=1e-3)
    variable = keras.Variable(w.astype("float32"))
    optimizer.build([variable])
    optimizer.update_step_at(keras.ops.convert_to_tensor(g.astype("float32")), variable,
                             keras.ops.convert_to_tensor(1e-3), keras.ops.convert_to_tensor(3))
    m, v, t = 0.1 * g, 0.001 * g * g, 3
    want = w - 1e-3 / (1 - 0.9**t) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**t) + 1e-8)
    assert_float32_close(to_numpy(variable), want, 1)
    assert int(to_numpy(optimizer.iterations)) == 0


def test_keras_adam_places_epsilon_differently(rng):
    """The test above can fail: Keras's Adam misses the same formula on tiny gradients."""
    w, grads = draws(rng, 1)
    got = keras_steps(keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-8), w, grads)
    want = torch_adam(w, grads, 1e-3)
    assert np.abs(got - want).max() > 1e-4


def test_adam_follows_learning_rate_changes(rng, update_path):
    w, grads = draws(rng, 3)
    lrs = [1e-3, 1e-3, 2.5e-4]
    got = keras_steps(TorchAdam(learning_rate=1e-3), w, grads, lrs)
    assert_float32_close(got, torch_adam(w, grads, None, lrs=lrs), 3)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2)])
def test_sgd_matches_pytorch_formula_across_a_learning_rate_decay(rng, momentum, weight_decay,
                                                                  update_path):
    w, grads = draws(rng, 4)
    lrs = [0.1, 0.1, 0.025, 0.025]  # torch scales the whole momentum buffer by the new lr
    got = keras_steps(TorchSGD(learning_rate=0.1, momentum=momentum,
                               coupled_weight_decay=weight_decay), w, grads, lrs)
    assert_float32_close(got, torch_sgd(w, grads, lrs, momentum, weight_decay), 4)


@pytest.mark.parametrize("optimizer", [
    TorchAdam(learning_rate=3e-4, amsgrad=True, coupled_weight_decay=5e-4),
    TorchSGD(learning_rate=0.1, momentum=0.9, coupled_weight_decay=1e-3)])
def test_optimizers_serialise(optimizer):
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is type(optimizer)
    assert restored.get_config() == optimizer.get_config()


@pytest.mark.parametrize("optim,cls,amsgrad", [("adam", TorchAdam, False),
                                               ("amsgrad", TorchAdam, True),
                                               ("sgd", TorchSGD, None)])
def test_make_optimizer_builds_the_pytorch_optimisers(optim, cls, amsgrad):
    optimizer = kl.make_optimizer(kl.Config(optim=optim, weight_decay=1e-4, momentum=0.5))
    assert type(optimizer) is cls and optimizer.coupled_weight_decay == 1e-4
    if amsgrad is not None:
        assert optimizer.amsgrad is amsgrad and optimizer.epsilon == 1e-8
    assert isinstance(kl.make_optimizer(kl.Config()), TorchAdam)
    assert type(kl.make_optimizer(kl.Config(optim="keras_adam"))) is keras.optimizers.Adam


def test_keras_adam_refuses_weight_decay():
    with pytest.raises(ValueError, match="weight_decay 0.1 needs optim adam, amsgrad or sgd"):
        kl.Config(optim="keras_adam", weight_decay=0.1)


@pytest.mark.tensorflow_only
def test_adam_under_xla(rng):
    import tensorflow as tf

    w, grads = draws(rng, 2)
    optimizer = TorchAdam(learning_rate=1e-3, amsgrad=True, coupled_weight_decay=0.1)
    variable = keras.Variable(w.astype("float32"))
    optimizer.build([variable])

    @tf.function(jit_compile=True)
    def update(g):
        optimizer.apply([g], [variable])

    for g in grads:
        update(tf.constant(g.astype("float32")))
    # XLA's CPU division/sqrt round differently: ~1e-7, a 1e-4 fraction of the lr.
    np.testing.assert_allclose(variable.numpy(), torch_adam(w, grads, 1e-3, amsgrad=True,
                                                            weight_decay=0.1), rtol=0, atol=3e-7)
