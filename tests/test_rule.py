"""The update rule: applying each segment's gradients as soon as they exist gives the
same weights as one optimiser apply of all gradients at the end of the step."""

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_local as kl
from keras_local.steps import rule
from keras_local.steps.tensorflow import TensorFlowExecutor, per_call_safe

OPTIMISERS = {
    "adam": lambda: keras.optimizers.Adam(learning_rate=1e-2, epsilon=1e-8),
    "sgd_momentum": lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
}


def train_steps(name, shape, optimiser, per_segment, xla_update, steps=3):
    config = kl.Config(num_layers=2, num_hidden=16, dropout=0.1, feat_mult=1 / 32,
                       weight_decay=1e-3, jit_compile=False)
    keras.utils.set_random_seed(3)
    model = kl.build_model(name, shape, 4, config)
    model.compile(optimizer=OPTIMISERS[optimiser]())
    model.optimizer.build(model.trainable_variables)
    model.xla_update = xla_update

    @tf.function
    def step(x, y):
        inputs, onehot = rule.split_batch(model, (x, y))
        executor = TensorFlowExecutor(model, per_segment_apply=per_segment)
        return rule.train(model, executor, inputs, onehot)

    rng = np.random.default_rng(0)
    for _ in range(steps):
        step(rng.normal(size=(8,) + shape).astype("float32"), rng.integers(0, 4, 8))
    return [v.numpy() for v in model.weights], int(model.optimizer.iterations.numpy())


@pytest.mark.parametrize("optimiser,name,shape,xla_update", [
    ("adam", "mlp", (6, 6, 1), False),
    ("adam", "vgg6a", (8, 8, 3), True),
    pytest.param("sgd_momentum", "vgg6a", (8, 8, 3), False, marks=pytest.mark.slow),
])
def test_per_segment_apply_equals_one_apply_at_the_end(optimiser, name, shape, xla_update):
    end, end_steps = train_steps(name, shape, optimiser, per_segment=False, xla_update=xla_update)
    each, each_steps = train_steps(name, shape, optimiser, per_segment=True, xla_update=xla_update)
    assert end_steps == each_steps == 3  # the step counter advances once per training step
    for a, b in zip(end, each):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_per_segment_apply_is_the_default_where_it_is_exact():
    model = kl.build_model("mlp", (6, 6, 1), 4, kl.Config(num_layers=1, num_hidden=8))
    model.compile()
    assert TensorFlowExecutor(model).per_segment_apply
    assert not per_call_safe(keras.optimizers.Adam(global_clipnorm=1.0))
    assert not per_call_safe(keras.optimizers.SGD(use_ema=True))
