"""ResNets and wide ResNets as local blocks, and local modules (issue 13).

Tiny shapes: 8x8x3 inputs, feat_mult 1/16, batch 8.
"""

import contextlib

import keras
import numpy as np
import pytest

import keras_local as kl
from keras_local.models.modules import module_sizes
from keras_local.models.resnet import RESNETS, WIDE_RESNETS
from keras_local.steps import rule

from helpers import backbone_params, weights_by_path

SHAPE = (8, 8, 3)
RESIDUAL_NAMES = list(RESNETS) + [n + s for n in WIDE_RESNETS for s in ("", "a")]
HEAVY = {"resnet101", "resnet152"}  # 100+ convs: a build takes 5-10 s here
# The deeper networks of each kind repeat the code of the smallest (resnet18, resnet50,
# wresnet10-8, wresnet10-8a): their counts are checked in pytest -m slow only.
DEEP = HEAVY | {"resnet34", "wresnet16-4", "wresnet16-4a", "wresnet16-8", "wresnet16-8a",
                "wresnet28-10", "wresnet28-10a", "wresnet40-10", "wresnet40-10a"}


# ---------------------------------------------------------------- the script's counts
def _script_conv(ch_in, ch_out, k, bias, pre_act, post_act):
    """Parameters of the script's LocalLossBlockConv in backprop mode (its count_parameters):
    conv (+ bias), bn_pre(ch_in) when pre_act, bn(ch_out) unless (pre_act and backprop)."""
    params = k * k * ch_in * ch_out + (ch_out if bias else 0)
    if pre_act:
        params += 2 * ch_in
    else:
        params += 2 * ch_out  # created even when post_act=False (then unused in forward)
    return params


def script_parameter_count(name, num_classes=10, input_ch=3, feat_mult=1.0, pre_act=False):
    """The authors' count (train.py: ResNet / Wide_ResNet, backprop mode), written from the
    script's constructors; feat_mult also scales the wide ResNets (keras-local's extension).
    Returns (count, dead): ``dead`` are the parameters of a stem BatchNorm that the script
    creates but never applies in its forward pass (post_act=False stems)."""
    if name in RESNETS:
        kind, counts = RESNETS[name]
        expansion = 4 if kind == "bottleneck" else 1
        stem = int(64 * feat_mult)
        total = _script_conv(input_ch, stem, 3, False, False, not pre_act)
        dead = 2 * stem if pre_act else 0
        in_planes = stem
        for planes, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), counts):
            planes = int(planes * feat_mult)
            for i in range(count):
                s = stride if i == 0 else 1
                if kind == "basic":
                    total += _script_conv(in_planes, planes, 3, False, pre_act, not pre_act)
                    total += _script_conv(planes, planes, 3, False, pre_act, not pre_act)
                else:
                    total += _script_conv(in_planes, planes, 1, False, False, True)
                    total += _script_conv(planes, planes, 3, False, False, True)
                    total += _script_conv(planes, 4 * planes, 1, False, False, True)
                if s != 1 or in_planes != expansion * planes:
                    total += in_planes * expansion * planes + 2 * expansion * planes
                in_planes = expansion * planes
        return total + in_planes * num_classes + num_classes, dead
    adapted = name.endswith("a")
    depth, widen = WIDE_RESNETS[name.rstrip("a")]
    n = (depth - 4) // 6
    stages = ([16 * widen, 16 * widen, 32 * widen, 64 * widen] if adapted
              else [16, 16 * widen, 32 * widen, 64 * widen])
    stages = [int(c * feat_mult) for c in stages]
    total = _script_conv(input_ch, stages[0], 3, True, False, False)
    dead = 2 * stages[0]
    in_planes = stages[0]
    for planes, stride in zip(stages[1:], (1, 2, 2)):
        for i in range(n):
            s = stride if i == 0 else 1
            total += _script_conv(in_planes, planes, 3, True, True, False)
            total += _script_conv(planes, planes, 3, True, True, False)
            if s != 1 or in_planes != planes:
                total += in_planes * planes + planes
            in_planes = planes
    total += 2 * stages[3]  # final bn1
    total += stages[3] * (16 if adapted else 1) * num_classes + num_classes
    return total, dead


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_173_962), ("resnet34", 21_282_122), ("resnet50", 23_520_842),
    ("wresnet16-4", 2_751_178), ("wresnet28-10", 36_489_322)])
def test_script_formula_gives_the_published_counts(name, expected):
    assert script_parameter_count(name)[0] == expected


@pytest.mark.parametrize("name", ["resnet18", "wresnet16-4"])
def test_full_width_backbone_equals_the_authors(name):
    model = kl.build_model(name, (32, 32, 3), 10, kl.Config())
    count, dead = script_parameter_count(name)
    # wresnet: the script's stem BatchNorm is never applied in its forward pass (its
    # stem is post_act=False); here it normalises only the stem's local-loss input, so
    # it belongs to the stem's heads: 2,751,178 - 32 parameters remain for inference.
    assert backbone_params(model) == count - dead
    assert backbone_params(model) == {"resnet18": 11_173_962, "wresnet16-4": 2_751_146}[name]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n
                                  for n in kl.list_models() if n in RESIDUAL_NAMES])
def test_every_residual_architecture_counts_like_the_script(name):
    config = kl.Config(feat_mult=1 / 16, backprop=True)
    model = kl.build_model(name, (32, 32, 3), 10, config)
    count, dead = script_parameter_count(name, feat_mult=1 / 16)
    assert backbone_params(model) == count - dead


def test_pre_act_counts_like_the_script():
    model = kl.build_model("resnet18", (32, 32, 3), 10,
                           kl.Config(feat_mult=1 / 16, pre_act=True, backprop=True))
    count, dead = script_parameter_count("resnet18", feat_mult=1 / 16, pre_act=True)
    assert dead > 0 and backbone_params(model) == count - dead
    stem = model.feature_layers[0]
    assert stem.order == "none" and model.feature_layers[1].order == "pre"


def test_every_residual_name_is_registered():
    assert set(RESIDUAL_NAMES) <= set(kl.list_models())
    assert {"resnet18", "wresnet28-10", "wresnet28-10a"} <= set(kl.list_models())


# ------------------------------------------------------------------------- training
def small(**changes):
    base = dict(feat_mult=1 / 16, optim="sgd", lr=0.1, jit_compile=False)
    base.update(changes)
    return kl.Config(**base)


def batch(rng, n=8, classes=4):
    return (rng.normal(size=(n,) + SHAPE).astype("float32"),
            rng.integers(0, classes, n).astype("int32"))


def owned(weights, block):
    """A block's own weights (encoder, BN, shortcut), without heads."""
    return {p: w for p, w in weights.items() if p.startswith(block + "/") and "head" not in p}


def train_twice(config, rng, altered_block, name="resnet18"):
    """Weights before, and after one SGD step of two copies that differ only in the heads
    of ``altered_block``."""
    x, y = batch(rng)
    results = []
    for alter in (False, True):
        keras.utils.set_random_seed(3)
        model = kl.build_model(name, SHAPE, 4, config)
        before = weights_by_path(model)
        if alter:
            block = next(b for b in model.local_blocks if b.name == altered_block)
            for head in block.heads.values():
                for v in head.trainable_weights:
                    v.assign(np.random.default_rng(7).normal(size=v.shape).astype("float32"))
        model.compile()
        model.train_on_batch(x, y)
        results.append(weights_by_path(model))
    return before, results[0], results[1]


def changed(a, b):
    return any(not np.allclose(a[p], b[p]) for p in a)


def test_no_gradient_crosses_a_residual_block_boundary(rng):
    """Altering block_3's heads (conv 2 of the first residual block, whose identity
    shortcut adds the stem's output) changes nothing in the stem or in block_2 (conv 1 of
    the same residual block): each conv is a module. wresnet10-8a: 7 convs to trace
    instead of resnet18's 17, the same first residual block with an identity shortcut."""
    model = kl.build_model("wresnet10-8a", SHAPE, 4, small())
    block_3 = next(b for b in model.local_blocks if b.name == "block_3")
    assert block_3.role == "last" and block_3.shortcut_kind == "identity"
    before, plain, altered = train_twice(small(), rng, "block_3", name="wresnet10-8a")
    for block in ("block_1", "block_2"):
        assert changed(owned(before, block), owned(plain, block)), f"{block} did not train"
        for path, value in owned(plain, block).items():
            np.testing.assert_array_equal(value, altered[path], err_msg=path)
    assert changed(owned(plain, "block_3"), owned(altered, "block_3"))


def test_gradients_flow_inside_a_module_and_not_between(rng):
    """modules=4 on wresnet10-8a's 7 convs (sizes 2, 2, 2, 1): block_3 (conv 2 of the
    first residual block) + block_4 (conv 1 of the second) form one module whose heads
    sit on block_4 (block_3 has none), so block_4's heads train block_3 (across the
    residual block boundary), and never the module before."""
    config = small(modules=4)
    model = kl.build_model("wresnet10-8a", SHAPE, 4, config)
    assert [b.role for b in model.local_blocks[1:5]] == ["first", "last", "first", "last"]
    heads = [b.name for b in model.local_blocks if b.has_heads]
    assert heads == ["block_2", "block_4", "block_6", "block_7"]
    assert [s.name for s in rule.plan(model)][:2] == ["block_2", "block_4"]
    before, plain, altered = train_twice(config, rng, "block_4", name="wresnet10-8a")
    assert changed(owned(plain, "block_3"), owned(altered, "block_3")), \
        "no gradient reached block_3 from its module's loss"
    for block in ("block_1", "block_2"):
        assert changed(owned(before, block), owned(plain, block)), f"{block} did not train"
        for path, value in owned(plain, block).items():
            np.testing.assert_array_equal(value, altered[path], err_msg=path)


@pytest.mark.tensorflow_only
def test_shortcut_is_trained_only_by_its_blocks_loss(rng):
    """Segment by segment as the update rule runs them: the 1x1 conv + BN shortcut of
    block_7 (conv 2 of stage 2's first block) gets a gradient from block_7's loss only."""
    import tensorflow as tf

    model = kl.build_model("resnet18", SHAPE, 4, small())
    owner = next(b for b in model.local_blocks if b.shortcut is not None)
    assert owner.name == "block_7" and owner.shortcut_kind == "conv_bn"
    shortcut_vars = owner.shortcut.trainable_variables
    x, y = batch(rng)
    onehot = keras.ops.one_hot(y, 4)
    h, touched = tf.constant(x), []
    for segment in rule.plan(model):
        with tf.GradientTape() as tape:
            loss, out = rule.segment_loss(model, segment, h, onehot,
                                          lambda device: contextlib.nullcontext())
        grads = tape.gradient(loss, shortcut_vars + segment.trainable_variables)
        own = grads[len(shortcut_vars):]
        encoder_grads = [g for g, v in zip(own, segment.trainable_variables) if "encoder" in v.path]
        assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in encoder_grads), \
            segment.name
        if any(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads[:len(shortcut_vars)]):
            touched.append(segment.name)
        h = rule.stop_gradient_structure(out, tf.stop_gradient)
    assert touched == ["block_7"]


# Each case traces a step of 7-17 segments (the costly part on CPU): the smallest
# registered networks cover every order (post / pre / none), shortcut kind and mode.
# All but backprop are slow (pytest -m slow; each took 2-3 minutes on 2 busy cores); the
# default run's local-loss residual cases are the locality tests below.
@pytest.mark.parametrize("name,changes", [
    pytest.param("resnet18", {"pre_act": True, "dropout": 0.1}, marks=pytest.mark.slow),
    ("wresnet10-8", {"backprop": True}),
    pytest.param("wresnet10-8", {"no_detach": True, "dropout": 0.2}, marks=pytest.mark.slow),
    pytest.param("wresnet10-8a", {"bio": True, "dropout": 0.2}, marks=pytest.mark.slow),
    pytest.param("wresnet10-8a", {"modules": 2}, marks=pytest.mark.slow)])
def test_residual_modes_train_and_inference_model_matches(rng, name, changes):
    model = kl.build_model(name, SHAPE, 4, small(optim="adam", lr=1e-2, **changes))
    model.compile()
    x, y = batch(rng, n=16)
    logs = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][-1])
    if not changes.get("backprop"):
        assert any(k.endswith("_loss") and k.startswith("block_") for k in logs)
    plain = model.inference_model()
    assert not any("head" in v.path or "dropout" in v.path for v in plain.weights)
    np.testing.assert_allclose(plain.predict(x, verbose=0),
                               keras.ops.convert_to_numpy(model(x, training=False)), atol=1e-5)


# -------------------------------------------------------------------------- modules
def test_module_sizes_are_balanced():
    assert module_sizes(17, 4) == [5, 4, 4, 4]
    assert module_sizes(3, 3) == [1, 1, 1] and module_sizes(5, 1) == [5]
    with pytest.raises(ValueError, match="between 1 and the number of local layers \\(3\\)"):
        module_sizes(3, 4)


@pytest.mark.parametrize("name,shape,layers", [("mlp", (6, 6, 1), 3), ("vgg6a", (8, 8, 3), 7)])
def test_modules_group_mlp_and_vgg(name, shape, layers):
    config = kl.Config(num_layers=3, num_hidden=8, feat_mult=1 / 32, modules=2)
    model = kl.build_model(name, shape, 4, config)
    assert len(model.local_blocks) == layers
    with_heads = [b.has_heads for b in model.local_blocks]
    assert sum(with_heads) == 2 and with_heads[-1]
    assert len(rule.plan(model)) == 3  # two modules + the output layer
    one = kl.build_model(name, shape, 4, config.replace(modules=1))
    assert [b.has_heads for b in one.local_blocks] == [False] * (layers - 1) + [True]


def test_too_many_modules_is_a_clear_error():
    with pytest.raises(ValueError, match="between 1 and the number of local layers \\(3\\), got 4"):
        kl.build_model("mlp", (6, 6, 1), 4, kl.Config(num_layers=3, num_hidden=8, modules=4))


# --------------------------------------------------------------------------- export
@pytest.mark.tensorflow_only
@pytest.mark.parametrize("name,changes", [("resnet18", {}), ("wresnet10-8a", {"pre_act": True})])
def test_residual_export_parity(rng, tmp_path, name, changes):
    """SavedModel and ONNX of a ResNet (shortcuts, identity and 1x1 conv [+ BN]; post-,
    pre- and no-activation convs) reproduce Keras within 1e-4, with BatchNorm statistics
    far from their initial values."""
    from keras_local.exporting import PARITY_TOLERANCE, export_model

    model = kl.build_model(name, SHAPE, 10, small(**changes))  # CIFAR-10's class names
    for v in model.weights:
        if "moving_mean" in v.path or "moving_variance" in v.path or "gamma" in v.path:
            low = 0.5 if "mean" not in v.path else -0.5
            v.assign(rng.uniform(low, low + 1.0, size=v.shape).astype("float32"))
    images = rng.uniform(0, 255, size=(16,) + SHAPE).astype("float32")
    metadata = export_model(model, tmp_path / "export", check_images=images)
    assert set(metadata["parity_max_abs_diff"]) == {"savedmodel", "onnx"}
    assert max(metadata["parity_max_abs_diff"].values()) < PARITY_TOLERANCE
    assert metadata["parameter_count"] == model.inference_model().count_params()


def test_residual_blocks_have_their_local_metrics_once_built():
    # Block metrics are created when a block is built (on its device under placement);
    # ResidualConv builds itself, so it must create them too.
    model = kl.build_model("wresnet10-8", SHAPE, 4, small())
    names = {m.name for m in model.metrics}
    for block in model.local_blocks:
        if block.has_heads:
            assert {f"{block.name}_pred_loss", f"{block.name}_sim_loss"} <= names, block.name
