"""A conv LocalBlock's training pass on TensorFlow whose backward pass walks the batch in
chunks, so that no full-size gradient map ever exists.

The built-in local losses read h only through small per-example summaries: the pred
head's pooled map and the sim head's per-channel spatial std of conv(h) (the rows of S).
``block_forward`` is one custom gradient from the block's input and weights to h and
those summaries; the losses on the summaries stay ordinary autodiff. The sim head's conv
runs per chunk and its outputs are kept for the backward pass, which then runs two passes
over the chunks, one chunk at a time:

1. the sim maps' gradient, the sim conv's input and filter gradients, the pred head's
   unpooled gradient, LeakyReLU's gradient dy (kept), and the chunk's share of
   BatchNorm's two reductions (sum dy, sum dy * x_hat); each sim map is freed here;
2. BatchNorm's input gradient and the encoder's filter gradient (and input gradient,
   which TensorFlow prunes where nothing reads it: a segment's input has none).

The block then holds its input, h, the sim maps or dy (together one map) and a few
chunk-sized temporaries, where autodiff held about three more full-size maps (the two
heads' input gradients, BatchNorm's temporaries). x_hat is rebuilt from h as in
``gradients.batch_norm_leaky_relu``. Same values and gradients as autodiff to float32
rounding (tests/test_tf_chunked_block.py). Where it applies is decided by
``keras_local.kernels.tensorflow.TensorFlowPaths.chunks_block``.

Each pass over the chunks is one ``tf.while_loop`` (``_for_chunks``), its body traced once,
one chunk at a time; its lists (TensorArrays) hold the chunks' sim maps and dy.
"""

from keras_local.kernels.tensorflow import gradients, winograd

# The backward pass's chunks (empty ones where the batch is smaller). Fewer chunks for
# blocks with small maps measured higher peaks, not lower (vgg13, 32x32x3, batch 128: 113
# MiB with 8 chunks in every block, 173 with chunks of at most 4 MiB, 203 with 2 MiB).
CHUNKS = 8


def block_forward(block, inputs):
    """(h, summaries) of ``block`` in training mode on ``inputs``: h = LeakyReLU(BatchNorm(
    conv(inputs))), the BatchNorm moving statistics updated, and summaries {"pred": the
    pooled map, "sim": the rows of S} for the heads the block has."""
    import tensorflow as tf

    encoder, bn = block.encoder, block.bn
    pred, sim = block.heads.get("pred"), block.heads.get("sim")
    slope = float(block.activation.negative_slope)
    epsilon = bn.epsilon
    names = ["x", "kernel", "gamma", "beta"]
    args = [inputs, tf.convert_to_tensor(encoder.kernel), tf.convert_to_tensor(bn.gamma),
            tf.convert_to_tensor(bn.beta)]
    if encoder.use_bias:
        names.append("bias")
        args.append(tf.convert_to_tensor(encoder.bias))
    if sim is not None:
        names.append("sim_kernel")
        args.append(tf.convert_to_tensor(sim.transform.kernel))
    stats = {}

    @tf.custom_gradient
    def forward(*values):
        w = dict(zip(names, values))
        z = conv(w["x"], w["kernel"])
        if "bias" in w:
            z = tf.nn.bias_add(z, w["bias"])
        # Precise batch statistics (gradients.moments), then the fused kernel in
        # inference mode normalises with them; the backward pass below is this block's own.
        mean, variance = gradients.moments(z)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            z, w["gamma"], w["beta"], mean=mean, variance=variance, epsilon=epsilon,
            data_format="NHWC", is_training=False)
        h = tf.nn.leaky_relu(y, alpha=slope)
        count = tf.cast(tf.size(z) // tf.size(mean), z.dtype)
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
        stats["mean"], stats["unbiased"] = mean, unbiased
        kept = gradients.kept_channels(w["gamma"], w["beta"])
        kept_z = tf.gather(z, kept, axis=-1)  # (..., 0) in the usual case: no memory
        outputs = [h]
        if pred is not None:
            outputs.append(pred.pool(h))
        if sim is not None:
            def sim_chunk(index, carried, arrays):
                sim_map = conv(_chunk(h, index), w["sim_kernel"])
                std, sim_mean = gradients.std_forward(_positions(sim_map))
                return carried, [array.write(index, value) for array, value
                                 in zip(arrays, (sim_map, std, sim_mean))]

            width = sim.transform.kernel.shape[-1]
            _, (sim_maps, stds, sim_means) = _for_chunks(sim_chunk, (), [
                _chunk_array(h.dtype, h.shape[1:3] + (width,)),
                _chunk_array(h.dtype, (width,)), _chunk_array(h.dtype, (1, width))])
            outputs.append(stds.concat())

        def gradient(*upstream):
            upstream = dict(zip(["h"] + ["pred"] * (pred is not None)
                                + ["sim"] * (sim is not None), upstream))
            upstream = {name: g for name, g in upstream.items() if g is not None}
            rsqrt = tf.math.rsqrt(variance + epsilon)

            def x_hat(index):
                return gradients.x_hat_from_output(
                    _chunk(h, index), slope, w["gamma"], w["beta"], kept,
                    _chunk(kept_z, index), mean, rsqrt)

            # Pass 1: dy per chunk and BatchNorm's reductions. The loops start once the
            # upstream gradients exist (their first index waits for them): otherwise the
            # forward-only work of the first chunk would run during the forward pass.
            # The turned kernels (conv_input_gradient) wait for this block's backward pass:
            # made at the step's start, every block's would be alive at once (vgg19: 116 ->
            # 208 MiB).
            after = list(upstream.values())
            with tf.control_dependencies(after):
                if sim is not None:
                    sim_input_gradient = conv_input_gradient(w["sim_kernel"])

            def pass_one(index, sums, arrays):
                h_chunk = _chunk(h, index)
                terms = []
                if "h" in upstream:
                    terms.append(_chunk(upstream["h"], index))
                if "pred" in upstream:
                    terms.append(pred.pool.transpose(_chunk(upstream["pred"], index)))
                sums = dict(sums)
                if "sim" in upstream:
                    sim_map = arrays[1].read(index)
                    # Each sim map is freed here: its slot in the list now holds an empty
                    # chunk (the list is carried through this loop, not captured by it).
                    arrays = [arrays[0], arrays[1].write(index, sim_map[:0])]
                    flat = _positions(sim_map)
                    dmap = tf.reshape(gradients.std_gradient(
                        flat, sim_means.read(index), stds.read(index),
                        _chunk(upstream["sim"], index)), tf.shape(sim_map))
                    terms.append(sim_input_gradient(h_chunk, dmap))
                    sums["sim_kernel"] = sums["sim_kernel"] + conv_filter_gradient(
                        h_chunk, w["sim_kernel"], dmap)
                dh = _sum(terms) if terms else tf.zeros_like(h_chunk)
                dy = tf.raw_ops.LeakyReluGrad(gradients=dh, features=h_chunk, alpha=slope)
                sums["beta"] = sums["beta"] + gradients.channel_sum(dy)
                sums["gamma"] = sums["gamma"] + gradients.channel_sum(dy * x_hat(index))
                return sums, [arrays[0].write(index, dy)] + arrays[1:]

            sums = {"beta": tf.zeros_like(w["beta"]), "gamma": tf.zeros_like(w["gamma"])}
            if "sim" in upstream:
                sums["sim_kernel"] = tf.zeros_like(w["sim_kernel"])
            sums, arrays = _for_chunks(
                pass_one, sums, [_chunk_array(h.dtype, h.shape[1:])]
                + ([sim_maps] if "sim" in upstream else []), after)
            dys = arrays[0]
            dbeta, dgamma = sums["beta"], sums["gamma"]

            # Pass 2: BatchNorm's input gradient and the encoder's gradients.
            after = [dbeta, dgamma]
            with tf.control_dependencies(after):
                encoder_input_gradient = conv_input_gradient(w["kernel"])

            def dz(index):
                return (w["gamma"] * rsqrt) * (dys.read(index) - dbeta / count
                                               - x_hat(index) * (dgamma / count))

            def pass_two(index, sums, arrays):
                chunk_dz = dz(index)
                return {"kernel": sums["kernel"] + conv_filter_gradient(
                            _chunk(w["x"], index), w["kernel"], chunk_dz),
                        "bias": sums["bias"] + tf.reduce_sum(chunk_dz, [0, 1, 2])}, arrays

            # The input gradient has a loop of its own (dz again, elementwise) that
            # TensorFlow prunes where nothing reads it, as for a segment's input; inside
            # pass 2 it would always run.
            def input_gradient(index, sums, arrays):
                return sums, [arrays[0].write(index, encoder_input_gradient(
                    _chunk(w["x"], index), dz(index)))]

            encoder, _ = _for_chunks(pass_two, {"kernel": tf.zeros_like(w["kernel"]),
                                                "bias": tf.zeros_like(w["gamma"])}, [], after)
            _, (input_grads,) = _for_chunks(
                input_gradient, (), [_chunk_array(w["x"].dtype, w["x"].shape[1:])], after)
            grads = {"x": tf.ensure_shape(input_grads.concat(), w["x"].shape),
                     "kernel": encoder["kernel"], "gamma": dgamma, "beta": dbeta,
                     "bias": encoder["bias"]}
            if "sim" in upstream:
                grads["sim_kernel"] = sums["sim_kernel"]
            elif sim is not None:
                grads["sim_kernel"] = tf.zeros_like(w["sim_kernel"])
            return [grads[name] for name in names]

        return outputs, gradient

    outputs = forward(*args)
    bn.assign_moving_statistics(tf.stop_gradient(stats["mean"]),
                                 tf.stop_gradient(stats["unbiased"]))
    h, summaries = outputs[0], {}
    rest = list(outputs[1:])
    if pred is not None:
        summaries["pred"] = rest.pop(0)
    if sim is not None:
        summaries["sim"] = rest.pop(0)
    return h, summaries


def conv(x, kernel):
    """``tf.nn.conv2d(x, kernel, 1, "SAME")`` by oneDNN, also where Winograd would pay: the
    rounding of Winograd's input and output transforms in the forward and input-gradient
    convolutions put 1.85% of vgg8b's weights more than 1% of the learning rate away from
    a float64 run after 5 steps (the authors' float32 script: 1.77%; with these two on
    oneDNN: 1.40%), and on an AVX2 CPU they were no faster (docs/benchmarks.md section 11).
    Filter gradients keep Winograd (``conv_filter_gradient``)."""
    import tensorflow as tf

    output = tf.nn.conv2d(x, kernel, 1, "SAME")
    # oneDNN's AVX-512 kernels give an empty batch (a chunk past a small batch's end) the
    # input's channel count: (0, 8, 8, 12) from a 12 -> 3 kernel. The slice puts the right
    # count back so the chunks concatenate; on a full map it is an identity that TF forwards
    # without a copy (grappler removes an equivalent reshape, which would not help).
    return output[..., :kernel.shape[-1]]


def conv_filter_gradient(x, kernel, gradient):
    """The gradient with respect to ``kernel`` of ``conv(x, kernel)``, given the gradient
    of its output."""
    import tensorflow as tf

    if winograd.pays(x.shape, kernel.shape):
        return winograd.filter_gradient(x, gradient)
    return tf.compat.v1.nn.conv2d_backprop_filter(
        x, tf.shape(kernel), gradient, [1, 1, 1, 1], "SAME")


def conv_input_gradient(kernel):
    """``f(like, gradient)``: the gradient with respect to the input (shaped like ``like``)
    of a stride-1 'SAME' convolution with ``kernel``, given the gradient of its output.

    With an odd kernel the 'SAME' padding is symmetric, and the input gradient is the
    forward convolution of the output gradient with the kernel turned by 180 degrees and
    its channel axes swapped: the same products, summed in another order. oneDNN's forward
    kernel ran 1.2x (28x28x256) to 2.4x (14x14x512) faster than its backward-input kernel on
    the sim heads' maps (one chunk of 16, 2 cores); the vgg8b predsim step went from 16.5 to
    13.6 s (docs/benchmarks.md section 6)."""
    import tensorflow as tf

    height, width = kernel.shape[0], kernel.shape[1]
    if height % 2 and width % 2:
        turned = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
        return lambda like, gradient: conv(gradient, turned)
    return lambda like, gradient: tf.compat.v1.nn.conv2d_backprop_input(
        tf.shape(like), kernel, gradient, [1, 1, 1, 1], "SAME")


def _chunk(t, index):
    """Rows of chunk ``index`` of ``t``: CHUNKS chunks whose sizes differ by at most one,
    the larger ones first (16 examples in 8 chunks of 2; 5 in 5 of 1 and 3 empty ones)."""
    import tensorflow as tf

    batch = tf.shape(t)[0]
    size, larger = batch // CHUNKS, batch % CHUNKS
    start = index * size + tf.minimum(index, larger)
    return t[start:start + size + tf.cast(index < larger, tf.int32)]


def _chunk_array(dtype, shape):
    """A TensorArray of one value per chunk, each ``(chunk size,) + shape``."""
    import tensorflow as tf

    return tf.TensorArray(dtype, size=CHUNKS, infer_shape=False,
                          element_shape=tf.TensorShape([None]).concatenate(shape))


def _for_chunks(body, carried, arrays, after=()):
    """``body(index, carried, arrays) -> (carried, arrays)`` for every chunk in turn (a
    ``tf.while_loop``, one chunk at a time once ``after`` exists); returns the final
    ``(carried, arrays)``. One traced body serves all chunks: a Python loop over the
    chunks traced, and left Grappler to optimise, every chunk's ops again (with the
    Winograd loops inside, minutes for a vgg11b step)."""
    import tensorflow as tf

    with tf.control_dependencies(after):
        first = tf.constant(0) if not after else tf.identity(tf.constant(0))
    _, carried, arrays = tf.while_loop(
        lambda index, *_: index < CHUNKS,
        lambda index, carried, arrays: (index + 1,) + tuple(body(index, carried, arrays)),
        (first, carried, arrays), parallel_iterations=1)
    return carried, arrays


def _positions(feature_map):
    """(B, H, W, C) -> (B, H * W, C)."""
    import tensorflow as tf

    _, height, width, channels = feature_map.shape
    return tf.reshape(feature_map, (-1, height * width, channels))


def _sum(tensors):
    """A chain of additions. Not ``tf.add_n``: in allocation traces of a vgg19 step, the
    AddNs of this backward pass had their outputs (``AddN_*/tmp_var``) allocated when the
    step started, so every block's sums were alive for the whole step (~90 MiB)."""
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total
