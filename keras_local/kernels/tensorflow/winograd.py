"""3x3 stride-1 'SAME' convolutions and their filter gradients by Winograd's F(2x2, 3x3)
(Lavin & Gray 2016), for TensorFlow on CPUs.

Each 2x2 output tile is read from a 4x4 input tile; in the transformed domain the 3x3
convolution becomes 16 independent products [tiles, C] x [C, C_out], 2.25 times fewer
multiplications than the direct convolution. On this project's 2-core AVX2 machine
(`python benchmarks/winograd.py`, one chunk of 16 examples, 2026-11-28) oneDNN's direct
kernels took 123 / 143 ms (forward / filter gradient) on 28x28x256 maps and 132 / 156 ms on
14x14x512, these 94 / 99 and 106 / 126 ms. On maps of odd size the tiles overhang and the
direct kernel won (7x7x512: 33 against 69 ms), so ``pays`` keeps those on oneDNN.

Results equal the direct convolution's to float32 rounding (relative error below 1e-6,
tests/test_winograd.py). The 16 transformed copies of the input and of the output would
be 4 times the size of each map; a call walks its batch in equal groups whose copies hold
at most ``GROUP_BYTES``, one group after the other (a ``tf.while_loop``). Smaller groups
were also faster: one chunk of 28x28x256 in a single group ran slower than the direct
kernel (127 against 120 ms), in groups of 5 faster (79 against 108 ms, another run).
Each transform and the 16 products are a few ops on all tiles at once (one batched matmul):
written as Python loops over the 16 tile positions they were ~150 small ops per call,
traced again in every caller, and the vgg8b predsim step (28x28x1) took 191 s to trace
and run the first time, against 85 s with the direct kernels.
"""

import contextlib
import contextvars

GROUP_BYTES = 16 * 2**20
_DISABLED = contextvars.ContextVar("keras_local_winograd_disabled", default=False)

# G of F(2x2, 3x3): the kernel transform U = G g G^T.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


@contextlib.contextmanager
def disabled():
    """Within this block ``pays`` is False: the direct kernels (for comparisons)."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


def pays(input_shape, kernel_shape):
    """Whether the Winograd path is used for a stride-1 'SAME' convolution of a batch of
    ``input_shape`` (B, H, W, C) with a kernel of ``kernel_shape``: a 3x3 kernel, maps of
    even size at least 14x14, at least 128 channels in and out, and no GPU (cuDNN has its
    own Winograd kernels)."""
    import tensorflow as tf

    if _DISABLED.get() or tuple(kernel_shape[:2]) != (3, 3):
        return False
    _, height, width, _ = input_shape
    if None in (height, width) or height % 2 or width % 2 or min(height, width) < 14:
        return False
    if min(kernel_shape[2], kernel_shape[3]) < 128:
        return False
    return not tf.config.list_physical_devices("GPU")


def conv(x, kernel):
    """``tf.nn.conv2d(x, kernel, 1, "SAME")`` for a 3x3 ``kernel``."""
    import tensorflow as tf

    transformed = _kernel_transform(kernel)
    most = _group_size(x, max(kernel.shape[2], kernel.shape[3]))

    def group_output(group):
        tiles, rows, columns = _input_transform(group)
        return _output_transform(tf.matmul(tiles, transformed), group, rows, columns)

    count, size = _groups(x, most)
    outputs = tf.TensorArray(x.dtype, size=count, infer_shape=False,
                             element_shape=tf.TensorShape([None]).concatenate(
                                 x.shape[1:3]).concatenate([kernel.shape[3]]))
    _, outputs = tf.while_loop(
        lambda i, _: i < count,
        lambda i, out: (i + 1, out.write(i, group_output(x[i * size:(i + 1) * size]))),
        (tf.constant(0), outputs), parallel_iterations=1)
    return tf.ensure_shape(outputs.concat(), x.shape[:3] + (kernel.shape[3],))


def filter_gradient(x, gradient):
    """The gradient with respect to the 3x3 kernel of ``conv(x, kernel)``, given the
    gradient of its output."""
    import tensorflow as tf

    channels, out_channels = x.shape[-1], gradient.shape[-1]
    most = _group_size(x, max(channels, out_channels))

    def group_products(group, group_gradient):
        tiles, rows, columns = _input_transform(group)
        gradient_tiles = _gradient_transform(group_gradient, rows, columns)
        return tf.matmul(tiles, gradient_tiles, transpose_a=True)

    count, size = _groups(x, most)
    _, total = tf.while_loop(
        lambda i, _: i < count,
        lambda i, total: (i + 1, total + group_products(x[i * size:(i + 1) * size],
                                                        gradient[i * size:(i + 1) * size])),
        (tf.constant(0), tf.zeros((16, channels, out_channels), x.dtype)),
        parallel_iterations=1)
    # _gradient_transform leaves the 4th row and column of A dy A^T negated: negate the
    # 4th row of G instead.
    g = tf.constant(_G, dtype=x.dtype) * tf.constant([[1.0], [1.0], [1.0], [-1.0]], x.dtype)
    total = tf.reshape(total, (4, 4, channels, out_channels))
    return tf.einsum("ai,abco,bj->ijco", g, total, g)


def _groups(x, most):
    """(count, size) of equal groups of at most ``most`` examples covering the batch (the
    last one may be short): 16 examples in groups of at most 10 as 8 + 8, not 10 + 6, whose
    smaller products ran slower (14x14x512 forward: 148 against 106 ms)."""
    import tensorflow as tf

    batch = tf.shape(x)[0]
    count = (batch + most - 1) // most
    return count, (batch + count - 1) // tf.maximum(count, 1)


def _group_size(x, channels):
    """Examples per group: the 16 transformed tiles of a group hold at most GROUP_BYTES
    (at least one example per group)."""
    _, height, width, _ = x.shape
    per_example = 16 * ((height + 1) // 2) * ((width + 1) // 2) * channels * x.dtype.size
    return max(1, GROUP_BYTES // per_example)


def _four(even, odd, count, axis, stack_axis):
    """B^T d along one axis, stacked on ``stack_axis``: rows d0..d3 of every tile, where
    d_k = row 2i + k (``even``, ``odd``: rows 2i and 2i + 1 on their ``axis``)."""
    import tensorflow as tf

    d0, d1 = _range(even, axis, 0, count), _range(odd, axis, 0, count)
    d2, d3 = _range(even, axis, 1, count + 1), _range(odd, axis, 1, count + 1)
    return tf.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3], axis=stack_axis)


def _range(t, axis, start, stop):
    """``t[start:stop]`` along ``axis``."""
    return t[(slice(None),) * axis + (slice(start, stop),)]


def _input_transform(x):
    """B^T d B of every 4x4 tile (stride 2) of the zero-padded ``x``: (16, tiles, C) in
    the order (tile row, tile column), and the tile rows and columns. Every transform here
    is a few ops on all tiles at once: Python loops over the 16 tile positions made
    hundreds of small ops per call, traced again in every caller."""
    import tensorflow as tf

    _, height, width, channels = x.shape
    rows, columns = (height + 1) // 2, (width + 1) // 2
    padded = tf.pad(x, [[0, 0], [1, 1 + 2 * rows - height], [1, 1 + 2 * columns - width],
                        [0, 0]])
    by_row = tf.reshape(padded, (-1, rows + 1, 2, 2 * columns + 2, channels))
    by_row = _four(by_row[:, :, 0], by_row[:, :, 1], rows, 1, 0)  # (4, B, rows, W', C)
    by_column = tf.reshape(by_row, (4, -1, rows, columns + 1, 2, channels))
    tiles = _four(by_column[..., 0, :], by_column[..., 1, :], columns, 3, 1)
    return tf.reshape(tiles, (16, -1, channels)), rows, columns


def _output_transform(products, x, rows, columns):
    """A^T m A of the (16, tiles, C_out) products: the (B, H, W, C_out) output."""
    import tensorflow as tf

    _, height, width, _ = x.shape
    out_channels = products.shape[-1]
    m = tf.reshape(products, (4, 4, -1, rows, columns, out_channels))
    by_row = tf.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])  # (2, 4 columns, ...)
    corners = tf.stack([by_row[:, 0] + by_row[:, 1] + by_row[:, 2],
                        by_row[:, 1] - by_row[:, 2] - by_row[:, 3]], axis=1)
    # corners[a, b, n, i, j] is the output pixel (2i + a, 2j + b) of example n.
    y = tf.reshape(tf.transpose(corners, (2, 3, 0, 4, 1, 5)),
                   (-1, 2 * rows, 2 * columns, out_channels))
    return y[:, :height, :width, :]


def _two(first, second, stack_axis):
    """A e along one axis of a 2-row tile, its 4th row negated (see filter_gradient)."""
    import tensorflow as tf

    return tf.stack([first, first + second, first - second, second], axis=stack_axis)


def _gradient_transform(gradient, rows, columns):
    """A dy A^T of every 2x2 tile of the output gradient: (16, tiles, C_out)."""
    import tensorflow as tf

    _, height, width, out_channels = gradient.shape
    padded = tf.pad(gradient, [[0, 0], [0, 2 * rows - height], [0, 2 * columns - width],
                               [0, 0]])
    by_row = tf.reshape(padded, (-1, rows, 2, 2 * columns, out_channels))
    by_row = _two(by_row[:, :, 0], by_row[:, :, 1], 0)  # (4, B, rows, 2 columns, C_out)
    by_column = tf.reshape(by_row, (4, -1, rows, columns, 2, out_channels))
    tiles = _two(by_column[..., 0, :], by_column[..., 1, :], 1)
    return tf.reshape(tiles, (16, -1, out_channels))


def _kernel_transform(kernel):
    """G g G^T: (16, C, C_out)."""
    import tensorflow as tf

    g = tf.constant(_G, dtype=kernel.dtype)
    transformed = tf.einsum("ai,ijco,bj->abco", g, kernel, g)
    return tf.reshape(transformed, (16,) + tuple(kernel.shape[2:]))
