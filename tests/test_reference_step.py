"""Whole training steps of keras-local against an independent float64 computation.

``ReferenceNet`` below is the method written out in NumPy float64 from its definition
(forward pass, local pred + sim losses weighted by beta, the similarity matrix, BatchNorm
with batch statistics and PyTorch's moving-statistics update with the unbiased variance,
PyTorch's Adam), with gradients from a small reverse-mode autodiff (``Node``). It shares
no code with keras-local: only the starting weights are copied in. keras-local runs its
default training step (``train_on_batch``, TensorFlow backend) from the same weights on
the same batches, dropout 0, and both are compared after 1 and 3 steps.

Tolerances. The gradients themselves (Adam's first moment after step 1, 0.1 * the
gradient) must agree to 1e-4 of their tensor's largest entry: float32 rounding gives
~1e-6 here. The weights must agree to 1e-2 * lr (the "off by more than 1% of the learning
rate" measure): Adam's first update is lr * g / (|g| + eps), insensitive to rounding
except where |g| itself is near rounding level (seen: g = 5e-7 next to 0.3, off by 3e-3 *
lr). A wrong gradient is off by a whole step: the bio loss's old gradient at logit 0 (-t
instead of 0.5 - t) moved pred-head weights by -lr instead of +lr.
"""

import numpy as np
import pytest

import keras

import keras_local as kl

from helpers import to_numpy, weights_by_path

pytestmark = pytest.mark.tensorflow_only

BETA = 0.99
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's: running = (1 - momentum) * running + momentum * batch
ADAM = dict(beta_1=0.9, beta_2=0.999, epsilon=1e-8)


# --------------------------------------------------------------------------- autodiff
class Node:
    """A float64 value in a computation graph; ``backward`` maps the gradient of the
    output to the gradients of ``parents``."""

    def __init__(self, value, parents=(), backward=None):
        self.value = np.asarray(value, dtype=np.float64)
        self.parents = parents
        self.backward = backward


def const(value):
    return Node(value)


def _unbroadcast(gradient, shape):
    while gradient.ndim > len(shape):
        gradient = gradient.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and gradient.shape[axis] != 1:
            gradient = gradient.sum(axis=axis, keepdims=True)
    return gradient


def add(a, b):
    return Node(a.value + b.value, (a, b),
                lambda g: (_unbroadcast(g, a.value.shape), _unbroadcast(g, b.value.shape)))


def sub(a, b):
    return Node(a.value - b.value, (a, b),
                lambda g: (_unbroadcast(g, a.value.shape), _unbroadcast(-g, b.value.shape)))


def mul(a, b):
    return Node(a.value * b.value, (a, b),
                lambda g: (_unbroadcast(g * b.value, a.value.shape),
                           _unbroadcast(g * a.value, b.value.shape)))


def div(a, b):
    return Node(a.value / b.value, (a, b),
                lambda g: (_unbroadcast(g / b.value, a.value.shape),
                           _unbroadcast(-g * a.value / b.value**2, b.value.shape)))


def scale(a, factor):
    return Node(a.value * factor, (a,), lambda g: (g * factor,))


def matmul(a, b):
    return Node(a.value @ b.value, (a, b), lambda g: (g @ b.value.T, a.value.T @ g))


def total(a, axis=None, keepdims=False):
    def backward(g):
        if not keepdims and axis is not None:
            g = np.expand_dims(g, axis)
        return (np.broadcast_to(g, a.value.shape).copy(),)

    return Node(a.value.sum(axis=axis, keepdims=keepdims), (a,), backward)


def mean(a, axis=None, keepdims=False):
    count = a.value.size if axis is None else np.prod([a.value.shape[i] for i in np.atleast_1d(axis)])
    return scale(total(a, axis, keepdims), 1.0 / count)


def square(a):
    return Node(a.value**2, (a,), lambda g: (2 * g * a.value,))


def sqrt(a):
    root = np.sqrt(a.value)
    return Node(root, (a,), lambda g: (g / (2 * root),))


def exp(a):
    value = np.exp(a.value)
    return Node(value, (a,), lambda g: (g * value,))


def log(a):
    return Node(np.log(a.value), (a,), lambda g: (g / a.value,))


def softplus(a):
    """log(1 + e^a), derivative the logistic sigmoid."""
    return Node(np.logaddexp(0.0, a.value), (a,), lambda g: (g / (1 + np.exp(-a.value)),))


def leaky(a, slope):
    """ReLU (slope 0) or LeakyReLU; the derivative at exactly 0 is PyTorch's (slope)."""
    factor = np.where(a.value > 0, 1.0, slope)
    return Node(a.value * factor, (a,), lambda g: (g * factor,))


def clip(a, low, high):
    inside = (a.value >= low) & (a.value <= high)  # torch.clamp passes the bounds
    return Node(np.clip(a.value, low, high), (a,), lambda g: (g * inside,))


def reshape(a, shape):
    return Node(a.value.reshape(shape), (a,), lambda g: (g.reshape(a.value.shape),))


def transpose(a):
    return Node(a.value.T, (a,), lambda g: (g.T,))


def index(a, key):
    def backward(g):
        full = np.zeros_like(a.value)
        full[key] += g
        return (full,)

    return Node(a.value[key], (a,), backward)


def pad_spatial(a, pad_h, pad_w):
    widths = ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0))
    height, width = a.value.shape[1:3]
    return Node(np.pad(a.value, widths), (a,),
                lambda g: (g[:, pad_h:pad_h + height, pad_w:pad_w + width],))


def max_pool_2x2(a):
    batch, height, width, channels = a.value.shape
    windows = a.value.reshape(batch, height // 2, 2, width // 2, 2, channels)
    result = windows.max(axis=(2, 4))
    winner = windows == result[:, :, None, :, None]

    def backward(g):
        return ((winner * g[:, :, None, :, None]).reshape(a.value.shape),)

    return Node(result, (a,), backward)


def feedback_matmul(x, w, b, feedback):
    """x w + b whose gradient to x is g feedbackᵀ (feedback alignment)."""
    return Node(x.value @ w.value + b.value, (x, w, b),
                lambda g: (g @ feedback.T, x.value.T @ g, g.sum(axis=0)))


def gradients(loss, wrt):
    """d loss / d each node of ``wrt`` (zeros where the loss does not depend on it)."""
    order, seen = [], set()

    def visit(node):
        if id(node) in seen:
            return
        seen.add(id(node))
        for parent in node.parents:
            visit(parent)
        order.append(node)

    visit(loss)
    grads = {id(loss): np.ones_like(loss.value)}
    for node in reversed(order):
        if node.backward is None or id(node) not in grads:
            continue
        for parent, g in zip(node.parents, node.backward(grads[id(node)])):
            grads[id(parent)] = grads.get(id(parent), 0.0) + g
    return [grads.get(id(node), np.zeros_like(node.value)) for node in wrt]


# ------------------------------------------------------------------------ the method
def conv3x3_same(x, kernel):
    """Stride-1 'same' 3x3 convolution (cross-correlation, NHWC, kernel HWIO)."""
    batch, height, width, channels = x.value.shape
    padded = pad_spatial(x, 1, 1)
    out = None
    for i in range(3):
        for j in range(3):
            window = index(padded, (slice(None), slice(i, i + height), slice(j, j + width)))
            term = matmul(reshape(window, (-1, channels)), index(kernel, (i, j)))
            out = term if out is None else add(out, term)
    return reshape(out, (batch, height, width, kernel.value.shape[-1]))


def pool_geometry(channels, size, dim_in_decoder):
    """The pred head's average-pool kernel and padding (the method's rule)."""
    kernel_h = kernel_w = 1
    while channels * -(-size // kernel_h) * -(-size // kernel_w) > dim_in_decoder and kernel_h < size:
        kernel_h *= 2
        if channels * -(-size // kernel_h) * -(-size // kernel_w) > dim_in_decoder:
            kernel_w *= 2
    pads = [(k * (-(-size // k) - size // k)) // 2 for k in (kernel_h, kernel_w)]
    return kernel_h, kernel_w, pads[0], pads[1]


def average_pool(h, dim_in_decoder):
    """Zero padding counted in the mean, stride = kernel (PyTorch's AvgPool2d)."""
    batch, size, _, channels = h.value.shape
    kernel_h, kernel_w, pad_h, pad_w = pool_geometry(channels, size, dim_in_decoder)
    out_h = (size + 2 * pad_h - kernel_h) // kernel_h + 1
    out_w = (size + 2 * pad_w - kernel_w) // kernel_w + 1
    padded = index(pad_spatial(h, pad_h, pad_w),
                   (slice(None), slice(0, out_h * kernel_h), slice(0, out_w * kernel_w)))
    windows = reshape(padded, (batch, out_h, kernel_h, out_w, kernel_w, channels))
    return mean(mean(windows, axis=4), axis=2)


def similarity(x):
    """S(x): per-channel spatial std (ddof=1) of a feature map with > 3 channels and
    spatial size > 1, else x flattened; rows centred, divided by 1e-8 + their norm;
    X Xᵀ clipped to [-1, 1]."""
    shape = x.value.shape
    if len(shape) == 4 and shape[-1] > 3 and shape[1] > 1:
        flat = reshape(x, (shape[0], shape[1] * shape[2], shape[3]))
        centred = sub(flat, mean(flat, axis=1, keepdims=True))
        x = sqrt(scale(total(square(centred), axis=1), 1.0 / (shape[1] * shape[2] - 1)))
    else:
        x = reshape(x, (shape[0], -1))
    centred = sub(x, mean(x, axis=1, keepdims=True))
    norm = sqrt(total(square(centred), axis=1, keepdims=True))
    rows = div(centred, add(const(1e-8), norm))
    return clip(matmul(rows, transpose(rows)), -1.0, 1.0)


def cross_entropy(logits, onehot):
    shifted = sub(logits, const(logits.value.max(axis=1, keepdims=True)))
    log_probs = sub(shifted, log(total(exp(shifted), axis=1, keepdims=True)))
    return scale(mean(total(mul(const(onehot), log_probs), axis=1)), -1.0)


def binary_cross_entropy(logits, targets):
    """mean of -[t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))] = softplus(z) - t z."""
    return mean(sub(softplus(logits), mul(const(targets), logits)))


class ReferenceNet:
    """The method in float64. ``layers``: ("conv", name) / ("dense", name) local blocks,
    ("pool",) 2x2 max-pools, ("flatten",); ``weights``: keras-local's weights by path
    (copied, float64); ``slope``: 0 (ReLU) or the LeakyReLU slope."""

    def __init__(self, layers, weights, slope, bio, dim_in_decoder):
        self.layers = layers
        self.w = {path: np.array(value, dtype=np.float64) for path, value in weights.items()}
        self.slope, self.bio, self.dim_in_decoder = slope, bio, dim_in_decoder
        self.m = {path: np.zeros_like(v) for path, v in self.w.items()}
        self.v = {path: np.zeros_like(v) for path, v in self.w.items()}
        self.steps = 0

    def block(self, name, kind, x, onehot):
        """(h, loss, {path: node}) of one local block on the (gradient-free) input x."""
        p = {suffix: Node(self.w[f"{name}/{name}_{suffix}"]) for suffix in (
            "encoder/kernel", "encoder/bias", "bn/gamma", "bn/beta")}
        z = conv3x3_same(x, p["encoder/kernel"]) if kind == "conv" else matmul(
            x, p["encoder/kernel"])
        z = add(z, p["encoder/bias"])
        axes = (0, 1, 2) if kind == "conv" else (0,)
        batch_mean = mean(z, axis=axes)
        batch_variance = mean(square(sub(z, batch_mean)), axis=axes)  # biased: normalises
        x_hat = div(sub(z, batch_mean), sqrt(add(batch_variance, const(BN_EPSILON))))
        h = leaky(add(mul(x_hat, p["bn/gamma"]), p["bn/beta"]), self.slope)
        count = z.value.size // z.value.shape[-1]
        for stat, batch_value in (("moving_mean", batch_mean.value),
                                  ("moving_variance", batch_variance.value * count / (count - 1))):
            key = f"{name}/{name}_bn/{stat}"
            self.w[key] = (1 - BN_MOMENTUM) * self.w[key] + BN_MOMENTUM * batch_value

        pooled = average_pool(h, self.dim_in_decoder) if kind == "conv" else h
        pooled = reshape(pooled, (pooled.value.shape[0], -1))
        if self.bio:
            projection = self.w[f"{name}/{name}_label_projection/projection"]
            for suffix in ("kernel", "bias"):
                p[f"pred_head/fa_dense/{suffix}"] = Node(
                    self.w[f"{name}/{name}_pred_head/fa_dense/{suffix}"])
            logits = feedback_matmul(pooled, p["pred_head/fa_dense/kernel"],
                                     p["pred_head/fa_dense/bias"],
                                     self.w[f"{name}/{name}_pred_head/fa_dense/feedback"])
            targets = onehot @ projection
            pred = binary_cross_entropy(logits, (targets > 0).astype(np.float64))
            sim_features = pooled if kind == "conv" else h
            sim = mean(square(sub(similarity(sim_features), const(similarity(const(targets)).value))))
        else:
            for suffix in ("kernel", "bias"):
                p[f"pred_head/dense/{suffix}"] = Node(
                    self.w[f"{name}/{name}_pred_head/dense/{suffix}"])
            logits = add(matmul(pooled, p["pred_head/dense/kernel"]), p["pred_head/dense/bias"])
            pred = cross_entropy(logits, onehot)
            head = "conv" if kind == "conv" else "dense"
            p[f"sim_head/{head}/kernel"] = Node(self.w[f"{name}/{name}_sim_head/{head}/kernel"])
            transformed = (conv3x3_same(h, p["sim_head/conv/kernel"]) if kind == "conv"
                           else matmul(h, p["sim_head/dense/kernel"]))
            sim = mean(square(sub(similarity(transformed), const(similarity(const(onehot)).value))))
        loss = add(scale(pred, 1 - BETA), scale(sim, BETA))
        return h, loss, {f"{name}/{name}_{suffix}": node for suffix, node in p.items()}

    def step(self, x, labels, num_classes, lr):
        onehot = np.eye(num_classes)[labels]
        grads = {}
        h = np.asarray(x, dtype=np.float64)
        for layer in self.layers:
            if layer[0] == "pool":
                h = max_pool_2x2(const(h)).value
            elif layer[0] == "flatten":
                h = h.reshape(h.shape[0], -1)
            else:
                out, loss, params = self.block(layer[1], layer[0], const(h), onehot)
                for path, g in zip(params, gradients(loss, list(params.values()))):
                    grads[path] = g
                h = out.value  # the next block's input carries no gradient
        kernel, bias = Node(self.w["output/kernel"]), Node(self.w["output/bias"])
        loss = scale(cross_entropy(add(matmul(const(h), kernel), bias), onehot), 1 - BETA)
        grads["output/kernel"], grads["output/bias"] = gradients(loss, [kernel, bias])
        self.adam(grads, lr)
        return grads

    def adam(self, grads, lr):
        """torch.optim.Adam: epsilon added after the bias correction."""
        self.steps += 1
        t, b1, b2 = self.steps, ADAM["beta_1"], ADAM["beta_2"]
        for path, g in grads.items():
            self.m[path] = b1 * self.m[path] + (1 - b1) * g
            self.v[path] = b2 * self.v[path] + (1 - b2) * g**2
            denominator = np.sqrt(self.v[path]) / np.sqrt(1 - b2**t) + ADAM["epsilon"]
            self.w[path] = self.w[path] - lr / (1 - b1**t) * self.m[path] / denominator


# -------------------------------------------------------------------------- the tests
def _layers(model):
    layers = []
    for layer in model.feature_layers:
        if isinstance(layer, keras.layers.MaxPooling2D):
            layers.append(("pool",))
        elif isinstance(layer, keras.layers.Flatten):
            layers.append(("flatten",))
        else:
            layers.append((layer.kind, layer.name))
    return layers


def _first_moments(model):
    optimizer = model.optimizer
    return {v.path.split("/", 1)[1]: to_numpy(
        optimizer._momentums[optimizer._get_variable_index(v)])
        for v in model.trainable_variables}


CASES = {
    # name: (architecture, example shape, Config changes)
    "mlp": ("mlp", (6, 6, 1), dict(num_layers=2, num_hidden=12)),
    "conv_leakyrelu": ("vgg6a", (8, 8, 3), dict(feat_mult=1 / 32, num_hidden=8,
                                                dim_in_decoder=64, nonlin="leakyrelu")),
    "conv_relu": ("vgg6a", (8, 8, 3), dict(feat_mult=1 / 32, num_hidden=8, dim_in_decoder=64)),
    "bio_mlp": ("mlp", (6, 6, 1), dict(num_layers=2, num_hidden=12, bio=True,
                                       target_proj_size=10)),
}


# The bio mlp runs in the default suite (its loss had the wrong gradient at logit 0); the
# others take ~30 s each on 2 cores.
@pytest.mark.parametrize("case", [
    pytest.param(case, marks=() if case == "bio_mlp" else pytest.mark.slow)
    for case in sorted(CASES)])
def test_training_steps_match_float64_reference(case):
    architecture, shape, changes = CASES[case]
    num_classes, batch, lr = 4, 16, 5e-4
    config = kl.Config(model=architecture, dropout=0.0, lr=lr, seed=3, **changes)
    model = kl.build_model(architecture, shape, num_classes, config)
    model.compile()
    reference = ReferenceNet(_layers(model), weights_by_path(model), 0.01 if config.nonlin == "leakyrelu"
                             else 0.0, config.bio, config.dim_in_decoder)
    rng = np.random.default_rng(11)
    # Offset inputs: the first BatchNorm sees a mean larger than its spread.
    batches = [(rng.normal(1.0, 1.0, size=(batch,) + shape).astype("float32"),
                rng.integers(0, num_classes, batch).astype("int32")) for _ in range(3)]
    for step, (x, y) in enumerate(batches, start=1):
        grads = reference.step(x, y, num_classes, lr)
        model.train_on_batch(x, y)
        got = weights_by_path(model)
        for path in grads:
            if path.endswith("encoder/bias"):
                # Followed by BatchNorm, the encoder bias has gradient 0 in exact arithmetic;
                # float32 rounding (PyTorch's too) leaves ~1e-10 of noise, whose sign Adam
                # turns into a whole step of lr. Both sides go on from keras-local's value.
                reference.w[path] = got[path].astype(np.float64)
        if step == 1:
            moments = _first_moments(model)
            for path, moment in moments.items():
                expected = (1 - ADAM["beta_1"]) * grads[path]
                if path.endswith("encoder/bias"):
                    kernel = moments[path.replace("bias", "kernel")]
                    assert np.abs(moment).max() <= 1e-5 * np.abs(kernel).max(), path
                    continue
                np.testing.assert_allclose(
                    moment, expected, rtol=0, atol=1e-4 * np.abs(expected).max() + 1e-12,
                    err_msg=f"{case}: gradient of {path} at step 1")
        if step in (1, 3):
            for path, value in reference.w.items():
                if path.endswith(("moving_mean", "moving_variance")):
                    np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-6,
                                               err_msg=f"{case}: {path} after step {step}")
                else:
                    np.testing.assert_allclose(got[path], value, rtol=0, atol=1e-2 * lr,
                                               err_msg=f"{case}: {path} after step {step}")
