"""PyTorch's default bias initialisation wherever the reference has a bias."""

import math

import numpy as np

import keras_local as kl

from helpers import to_numpy


def values(variable):
    return to_numpy(variable)


def assert_torch_uniform(bias, fan_in):
    """Inside U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and spread over it (>= 10 draws)."""
    bound = 1.0 / math.sqrt(fan_in)
    assert bias.size >= 10
    assert np.abs(bias).max() <= bound
    assert np.abs(bias).max() > 0.5 * bound and bias.min() < 0 < bias.max()


def small_vgg(**changes):
    config = kl.Config(**dict(dict(num_layers=1, num_hidden=32, feat_mult=1 / 4,
                                   dim_in_decoder=128), **changes))
    return kl.build_model("vgg6a", (8, 8, 3), 10, config)


def test_encoder_pred_head_and_output_biases():
    model = small_vgg()
    conv1, conv2, _, _, dense = model.local_blocks
    assert_torch_uniform(values(conv1.encoder.bias), 3 * 9)     # 32 filters on 3 channels
    assert_torch_uniform(values(conv2.encoder.bias), 32 * 9)
    assert_torch_uniform(values(dense.encoder.bias), 128)       # 1x1x128 flattened
    pred = conv1.heads["pred"].dense                            # 8x8x32 pooled to 2x2x32
    assert_torch_uniform(values(pred.bias), 128)
    assert not values(pred.kernel).any()                        # the reference zeroes it
    assert_torch_uniform(values(model.output_layer.bias), 32)
    assert not values(model.output_layer.kernel).any()          # local mode: weight only


def test_biases_are_seeded_per_block_and_reproducible():
    first, second = small_vgg(), small_vgg()
    np.testing.assert_array_equal(values(first.local_blocks[1].encoder.bias),
                                  values(second.local_blocks[1].encoder.bias))
    # No two parts share a random stream (their first draws would be equal up to scale).
    starts = [values(v)[0] / (1 / math.sqrt(fan_in)) for v, fan_in in [
        (first.local_blocks[1].encoder.bias, 32 * 9),
        (first.local_blocks[2].encoder.bias, 64 * 9),
        (first.local_blocks[1].heads["pred"].dense.bias, 128),
        (first.output_layer.bias, 32)]]
    assert len(set(np.round(starts, 6))) == len(starts)
    other = small_vgg(seed=2)
    assert not np.allclose(values(other.local_blocks[1].encoder.bias),
                           values(first.local_blocks[1].encoder.bias))


def test_backprop_output_and_bio_pred_head():
    backprop = small_vgg(backprop=True)
    assert_torch_uniform(values(backprop.output_layer.bias), 32)
    assert values(backprop.output_layer.kernel).any()
    bio = small_vgg(bio=True)
    fa = bio.local_blocks[0].heads["pred"].dense     # the reference's LinearFA: both zero
    assert not values(fa.bias).any() and not values(fa.kernel).any()
