"""Fused optimiser updates on TensorFlow: one kernel per variable.

Written as TensorFlow ops, an Adam update of one weight matrix is a dozen element-wise
ops, each a pass over the weights' memory (moments, temporaries). That is memory-bound
work, and while blocks train at the same time (the pipelined step, ``Config.pipeline``)
it slows the matrix products on the other cores, which share the memory bus and the
last-level cache. Adam (without AMSGrad) is TensorFlow's ``ResourceApplyAdam``: one pass
over weights, moments and gradient, its epsilon rescaled so that the update is PyTorch's
(below). AMSGrad and SGD are small XLA kernels (AMSGrad's are loops, XLA's CPU fusions:
moments, maximum, weights).

Used by ``keras_local.optimizers`` through ``keras_local.kernels.fast_paths`` (no
tf.distribute strategy, no GPU); elsewhere the optimisers run their backend-agnostic ops.
Inside an XLA-compiled step (the dense networks' default, the conv networks' compiled
update) the kernel is inlined into the enclosing computation. The formulas are those of
``TorchAdam`` / ``TorchSGD`` (tests/test_optimizers.py checks both against torch.optim's).
"""

import tensorflow as tf


def tf_variables(*variables):
    """The tf.Variables behind Keras ``variables``, or None when one of them has none (a
    strategy's per-replica variables, which these kernels do not resolve). None entries
    (absent slots) stay None. Whether the kernels apply at all is decided by
    ``keras_local.kernels.tensorflow.TensorFlowPaths.fused_updates``."""
    resolved = [v if v is None or isinstance(v, tf.Variable) else getattr(v, "value", v)
                for v in variables]
    if not all(v is None or isinstance(v, tf.Variable) for v in resolved):
        return None
    return resolved


def adam(variable, m, v, v_max, gradient, learning_rate, step, beta_1, beta_2, epsilon,
         weight_decay):
    """``TorchAdam``'s update of ``variable`` (``v_max`` None without AMSGrad)."""
    with tf.device(variable.device):
        if v_max is None:
            _apply_adam(variable, m, v, gradient, learning_rate, step, beta_1, beta_2, epsilon,
                        weight_decay)
            return
        _amsgrad(variable.handle, m.handle, v.handle, v_max.handle, gradient,
                 tf.convert_to_tensor(learning_rate), tf.convert_to_tensor(step),
                 variable.dtype, float(beta_1), float(beta_2), float(epsilon),
                 float(weight_decay))


def sgd(variable, buffer, gradient, learning_rate, momentum, weight_decay):
    """``TorchSGD``'s update of ``variable`` (``buffer`` None without momentum)."""
    with tf.device(variable.device):
        _sgd(variable.handle, None if buffer is None else buffer.handle, gradient,
             tf.convert_to_tensor(learning_rate), variable.dtype, float(momentum),
             float(weight_decay))


def _apply_adam(variable, m, v, gradient, learning_rate, step, beta_1, beta_2, epsilon,
                weight_decay):
    """PyTorch's Adam through ``ResourceApplyAdam``, which computes
        w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps')
    With eps' = eps * sqrt(1 - b2^t) that is PyTorch's
        w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""
    dtype = variable.dtype
    gradient = tf.cast(gradient, dtype)
    if weight_decay:
        gradient = gradient + tf.cast(weight_decay, dtype) * variable.read_value()
    step = tf.cast(step, dtype)
    power_1 = tf.pow(tf.cast(beta_1, dtype), step)
    power_2 = tf.pow(tf.cast(beta_2, dtype), step)
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=m.handle, v=v.handle, beta1_power=power_1, beta2_power=power_2,
        lr=tf.cast(learning_rate, dtype), beta1=tf.cast(beta_1, dtype),
        beta2=tf.cast(beta_2, dtype), epsilon=tf.cast(epsilon, dtype) * tf.sqrt(1 - power_2),
        grad=gradient)


# The kernels take resource handles, not tf.Variables: one trace then serves every
# variable of a dtype (XLA compiles once per shape), and no trace keeps a variable alive.
def _read(handle, dtype):
    return tf.raw_ops.ReadVariableOp(resource=handle, dtype=dtype)


def _write(handle, value):
    tf.raw_ops.AssignVariableOp(resource=handle, value=value)


@tf.function(jit_compile=True, autograph=False)
def _amsgrad(variable, m, v, v_max, gradient, learning_rate, step, dtype, beta_1, beta_2,
             epsilon, weight_decay):
    weights = _read(variable, dtype)
    gradient = tf.cast(gradient, dtype)
    if weight_decay:
        gradient = gradient + tf.cast(weight_decay, dtype) * weights
    step = tf.cast(step, dtype)
    correction_1 = 1 - tf.pow(tf.cast(beta_1, dtype), step)
    correction_2 = 1 - tf.pow(tf.cast(beta_2, dtype), step)
    new_m = _read(m, dtype)
    new_m = new_m + (gradient - new_m) * (1 - beta_1)
    new_v = _read(v, dtype)
    new_v = new_v + (tf.square(gradient) - new_v) * (1 - beta_2)
    _write(m, new_m)
    _write(v, new_v)
    new_v = tf.maximum(_read(v_max, dtype), new_v)
    _write(v_max, new_v)
    denominator = tf.sqrt(new_v) / tf.sqrt(correction_2) + epsilon
    _write(variable, weights - (tf.cast(learning_rate, dtype) / correction_1) * new_m / denominator)


@tf.function(jit_compile=True, autograph=False)
def _sgd(variable, buffer, gradient, learning_rate, dtype, momentum, weight_decay):
    weights = _read(variable, dtype)
    gradient = tf.cast(gradient, dtype)
    if weight_decay:
        gradient = gradient + tf.cast(weight_decay, dtype) * weights
    if buffer is not None:
        gradient = tf.cast(momentum, dtype) * _read(buffer, dtype) + gradient
        _write(buffer, gradient)
    _write(variable, weights - tf.cast(learning_rate, dtype) * gradient)
