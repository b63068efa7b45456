"""A conv LocalBlock's training pass on TensorFlow whose backward pass walks the batch in
chunks, so that no full-size gradient map ever exists.

The built-in local losses read h only through small per-example summaries: the pred
head's pooled map and the sim head's per-channel spatial std of conv(h) (the rows of S).
``block_forward`` is one custom gradient from the block's input and weights to h and
those summaries; the losses on the summaries stay ordinary autodiff. The sim head's conv
runs per chunk and its outputs are kept for the backward pass, which then runs two passes
over the chunks, one chunk at a time (control edges):

1. the sim maps' gradient, the sim conv's input and filter gradients, the pred head's
   unpooled gradient, LeakyReLU's gradient dy (kept), and the chunk's share of
   BatchNorm's two reductions (sum dy, sum dy * x_hat); each sim map is freed here;
2. BatchNorm's input gradient and the encoder's filter gradient (and input gradient,
   which TensorFlow prunes where nothing reads it: a segment's input has none).

The block then holds its input, h, the sim maps or dy (together one map) and a few
chunk-sized temporaries, where autodiff held about three more full-size maps (the two
heads' input gradients, BatchNorm's temporaries). x_hat is rebuilt from h as in
``tf_gradients.batch_norm_leaky_relu``. Same values and gradients as autodiff to float32
rounding (tests/test_tf_chunked_block.py). Used where ``applies`` says so: TensorFlow
outside XLA (``tf_gradients.active``), training with labels, and the common block shape
(conv 'same' stride 1, BatchNorm, LeakyReLU, pred/sim/predsim heads, not bio).
"""

from keras_local import tf_gradients, tf_winograd
from keras_local.losses import uses_spatial_std

# The backward pass's chunks (empty ones where the batch is smaller). Fewer chunks for
# blocks with small maps measured higher peaks, not lower (vgg13, 32x32x3, batch 128: 113
# MiB with 8 chunks in every block, 173 with chunks of at most 4 MiB, 203 with 2 MiB).
CHUNKS = 8
SUPPORTED_LOSSES = ("pred", "sim", "predsim")


def applies(block, inputs):
    """Whether ``block_forward`` can train ``block`` on ``inputs`` (see the module doc)."""
    if not (tf_gradients.active() and block.kind == "conv" and block.strides == 1
            and block.bn is not None and block.nonlin == "leakyrelu" and not block.bio
            and block.local_loss_name in SUPPORTED_LOSSES and block.unsup_loss_spec is None
            and not block.alpha and len(inputs.shape) == 4
            and None not in tuple(inputs.shape[1:])
            and block.bn.fuses_leaky_relu(inputs)):
        return False
    if "sim" in block.heads:  # S must read the sim map's spatial std, not the map itself
        _, height, width, _ = inputs.shape
        return uses_spatial_std((None, height, width, block.width), block.similarity_std)
    return True


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

    def split(t):
        batch = tf.shape(t)[0]
        return tf.split(t, (batch + CHUNKS - 1 - tf.range(CHUNKS)) // CHUNKS, num=CHUNKS)

    @tf.custom_gradient
    def forward(*values):
        w = dict(zip(names, values))
        z = conv(w["x"], w["kernel"])
        if "bias" in w:
            z = tf.nn.bias_add(z, w["bias"])
        # Precise batch statistics (tf_gradients.moments), then the fused kernel in
        # inference mode normalises with them; the backward pass below is this block's own.
        mean, variance = tf_gradients.moments(z)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            z, w["gamma"], w["beta"], mean=mean, variance=variance, epsilon=epsilon,
            data_format="NHWC", is_training=False)
        h = tf.nn.leaky_relu(y, alpha=slope)
        count = tf.cast(tf.size(z) // tf.size(mean), z.dtype)
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
        stats["mean"], stats["unbiased"] = mean, unbiased
        kept = tf_gradients.kept_channels(w["gamma"], w["beta"])
        kept_z = tf.gather(z, kept, axis=-1)  # (..., 0) in the usual case: no memory
        h_chunks = split(h)
        outputs = [h]
        if pred is not None:
            outputs.append(pred.pool(h))
        if sim is not None:
            sim_maps = [conv(part, w["sim_kernel"]) for part in h_chunks]
            stds, sim_means = zip(*[tf_gradients.std_forward(_positions(part))
                                    for part in sim_maps])
            outputs.append(tf.concat(stds, axis=0))

        def gradient(*upstream):
            upstream = dict(zip(["h"] + ["pred"] * (pred is not None)
                                + ["sim"] * (sim is not None), upstream))
            rsqrt = tf.math.rsqrt(variance + epsilon)
            split_upstream = {name: split(g) for name, g in upstream.items() if g is not None}
            kept_z_chunks = split(kept_z)

            def x_hat(index):
                return tf_gradients.x_hat_from_output(
                    h_chunks[index], slope, w["gamma"], w["beta"], kept,
                    kept_z_chunks[index], mean, rsqrt)

            # Pass 1: dy per chunk and BatchNorm's reductions.
            dys, beta_sums, gamma_sums, sim_kernel_grads = [], [], [], []
            after = [g for g in upstream.values() if g is not None]
            # The turned kernels (conv_input_gradient) wait for this block's backward pass:
            # made at the step's start, every block's would be alive at once (vgg19: 116 ->
            # 208 MiB).
            with tf.control_dependencies(after):
                if sim is not None:
                    sim_input_gradient = conv_input_gradient(w["sim_kernel"])
            for index in range(CHUNKS):
                with tf.control_dependencies(after):
                    terms = []
                    if "h" in split_upstream:
                        terms.append(split_upstream["h"][index])
                    if "pred" in split_upstream:
                        terms.append(pred.pool.transpose(split_upstream["pred"][index]))
                    if "sim" in split_upstream:
                        flat = _positions(sim_maps[index])
                        dmap = tf.reshape(tf_gradients.std_gradient(
                            flat, sim_means[index], stds[index], split_upstream["sim"][index]),
                            tf.shape(sim_maps[index]))
                        terms.append(sim_input_gradient(h_chunks[index], dmap))
                        sim_kernel_grads.append(
                            conv_filter_gradient(h_chunks[index], w["sim_kernel"], dmap))
                    dh = _sum(terms) if terms else tf.zeros_like(h_chunks[index])
                    dy = tf.raw_ops.LeakyReluGrad(gradients=dh, features=h_chunks[index],
                                                  alpha=slope)
                    beta_sums.append(tf_gradients.channel_sum(dy))
                    gamma_sums.append(tf_gradients.channel_sum(dy * x_hat(index)))
                dys.append(dy)
                after = [beta_sums[-1], gamma_sums[-1]] + sim_kernel_grads[-1:]
            dbeta, dgamma = _sum(beta_sums), _sum(gamma_sums)

            # Pass 2: BatchNorm's input gradient and the encoder's gradients.
            x_chunks = split(w["x"])
            kernel_grads, bias_grads, input_grads = [], [], []
            after = [dbeta, dgamma]
            with tf.control_dependencies(after):
                encoder_input_gradient = conv_input_gradient(w["kernel"])
            for index in range(CHUNKS):
                with tf.control_dependencies(after):
                    dz = (w["gamma"] * rsqrt) * (dys[index] - dbeta / count
                                                 - x_hat(index) * (dgamma / count))
                    kernel_grads.append(conv_filter_gradient(x_chunks[index], w["kernel"], dz))
                    bias_grads.append(tf.reduce_sum(dz, [0, 1, 2]))
                    input_grads.append(encoder_input_gradient(x_chunks[index], dz))
                after = [kernel_grads[-1], bias_grads[-1]]
            grads = {"x": tf.concat(input_grads, axis=0), "kernel": _sum(kernel_grads),
                     "gamma": dgamma, "beta": dbeta, "bias": _sum(bias_grads)}
            if sim is not None:
                grads["sim_kernel"] = _sum(sim_kernel_grads)
            return [grads[name] for name in names]

        return outputs, gradient

    outputs = forward(*args)
    bn._assign_moving_statistics(tf.stop_gradient(stats["mean"]),
                                 tf.stop_gradient(stats["unbiased"]))
    h, summaries = outputs[0], {}
    rest = list(outputs[1:])
    if pred is not None:
        summaries["pred"] = rest.pop(0)
    if sim is not None:
        summaries["sim"] = rest.pop(0)
    return h, summaries


def conv(x, kernel):
    """``tf.nn.conv2d(x, kernel, 1, "SAME")``, by Winograd where ``tf_winograd.pays``."""
    import tensorflow as tf

    if tf_winograd.pays(x.shape, kernel.shape):
        return tf_winograd.conv(x, kernel)
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

    if tf_winograd.pays(x.shape, kernel.shape):
        return tf_winograd.filter_gradient(x, gradient)
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
    13.6 s (README, "How the train step keeps locality")."""
    import tensorflow as tf

    height, width = kernel.shape[0], kernel.shape[1]
    if height % 2 and width % 2:
        turned = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
        return lambda like, gradient: conv(gradient, turned)
    return lambda like, gradient: tf.compat.v1.nn.conv2d_backprop_input(
        tf.shape(like), kernel, gradient, [1, 1, 1, 1], "SAME")


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
