"""The arithmetic of a training step: multiply-adds (MACs) counted from a LocalModel's
layers, and the float32 matmul peak of this machine they are compared with."""

import math
import time


def _conv_macs(layer, output_shape, batch):
    """MACs of a Conv2D forward: batch * H_out * W_out * (k * k * C_in * C_out)."""
    _, height, width, _ = output_shape
    return batch * height * width * math.prod(layer.kernel.shape)


def _dense_macs(layer, batch):
    return batch * math.prod(layer.kernel.shape)


def count_step_macs(model, batch_size):
    """Multiply-adds of one training step of ``model`` (a LocalModel) at ``batch_size``.

    Walks the model's layers and counts the forward MACs of the encoders (Conv2D /
    Dense), the heads (pred-head Dense, sim-head Conv2D / Dense) and the similarity
    matrices (S = X X^T of the sim head's features and of the labels; the spatial std
    that precedes it is counted as one MAC per element), and the output Dense.
    The backward pass of a layer costs two forward passes (input and weight
    gradients), one where the input gradient is not needed:

      backprop: encoders 3x (the first one 2x: no gradient w.r.t. the image), output 3x.
      local:    encoders 2x (the input is gradient-stopped), heads and similarities 3x
                (the gradient flows through them into h), output 2x.

    Returns a dict of forward MACs per part and ``step`` (the whole step's MACs).
    Element-wise ops (BatchNorm, activations, pooling, Adam) are not counted.
    """
    from keras_local.layers.block import LocalBlock

    shape = (batch_size,) + tuple(model.example_shape)
    parts = {"encoders": 0, "first_encoder": 0, "heads": 0, "similarity": 0, "output": 0}
    first = True
    for layer in model.feature_layers:
        out_shape = _with_batch(layer.compute_output_shape(shape), batch_size)
        if isinstance(layer, LocalBlock):
            # Residual convs pass (h, block input) pairs: the conv reads h.
            x_shape = shape[0] if isinstance(shape[0], tuple) else shape
            enc_out = (batch_size,) + tuple(layer.encoder.compute_output_shape(
                (batch_size,) + tuple(
                    layer.encoder_padding.compute_output_shape(x_shape)
                    if layer.encoder_padding is not None else x_shape)[1:]))[1:]
            macs = (_conv_macs(layer.encoder, enc_out, batch_size) if layer.kind == "conv"
                    else _dense_macs(layer.encoder, batch_size))
            shortcut = getattr(layer, "shortcut", None)
            if shortcut is not None:  # the 1x1 shortcut conv, trained with this block
                macs += _conv_macs(shortcut.encoder, enc_out, batch_size)
            parts["encoders"] += macs
            if first:
                parts["first_encoder"] = macs
                first = False
            parts["heads"] += _head_macs(layer, enc_out, batch_size)
            parts["similarity"] += _similarity_macs(layer, enc_out, batch_size)
        shape = out_shape
    parts["output"] = _dense_macs(model.output_layer, batch_size)
    if model.config.training_mode == "backprop":
        step = 3 * parts["encoders"] - parts["first_encoder"] + 3 * parts["output"]
    else:
        step = (2 * parts["encoders"] + 3 * (parts["heads"] + parts["similarity"])
                + 2 * parts["output"])
    return {**parts, "step": step}


def _with_batch(shape, batch):
    """``shape`` (or each shape of a pair) with its batch dimension set to ``batch``."""
    if isinstance(shape[0], tuple):
        return tuple(_with_batch(s, batch) for s in shape)
    return (batch,) + tuple(shape)[1:]


def _head_macs(block, h_shape, batch):
    macs = 0
    pred = block.heads.get("pred")
    if pred is not None:
        macs += _dense_macs(pred.dense, batch)
    sim = block.heads.get("sim")
    if sim is not None and sim.transform is not None and hasattr(sim.transform, "kernel"):
        if len(h_shape) == 4:
            macs += _conv_macs(sim.transform, h_shape, batch)
        else:
            macs += _dense_macs(sim.transform, batch)
    return macs


def _similarity_macs(block, h_shape, batch):
    """S(head(h)) and S(labels): B*B*features each, plus the spatial std of a map."""
    if "sim" not in block.heads:
        return 0
    if len(h_shape) == 4 and h_shape[-1] > 3 and h_shape[1] > 1:
        features = h_shape[-1]
        reduce = math.prod(h_shape)  # spatial std: about one MAC per element
    else:
        features = math.prod(h_shape[1:])
        reduce = 0
    return reduce + batch * batch * features + batch * batch * block.num_classes


def measure_matmul_peak(size, repeats=5, seconds=1.0):
    """Best float32 GFLOP/s of ``tf.matmul`` on square matrices of ``size`` and
    ``size // 2`` (the kernels train.py uses, all cores), one matmul after the other."""
    import tensorflow as tf

    best = 0.0
    for n in (size // 2, size):
        a = tf.random.normal((n, n), dtype=tf.float32)
        b = tf.random.normal((n, n), dtype=tf.float32)
        tf.matmul(a, b).numpy()
        for _ in range(repeats):
            calls, started = 0, time.perf_counter()
            while True:
                product = tf.matmul(a, b)  # eager CPU ops run one at a time, in order
                calls += 1
                if time.perf_counter() - started >= seconds:
                    break
            float(product[0, 0])
            elapsed = time.perf_counter() - started
            best = max(best, calls * 2 * n**3 / elapsed / 1e9)
    return best
