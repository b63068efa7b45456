import numpy as np
import pytest

import keras_local as kl
from keras_local.layers.heads import DecoderPooling, decoder_pool_geometry

from helpers import backbone_params


# docs/method.md section 5: backbone parameter counts.
@pytest.mark.parametrize("name,shape,feat_mult,num_layers,expected", [
    ("mlp", (28, 28, 1), 1, 3, 2.9e6),
    ("vgg8b", (28, 28, 1), 1, 1, 7.3e6),
    ("vgg8b", (32, 32, 3), 1, 1, 8.9e6),
    ("vgg11b", (32, 32, 3), 1, 1, 11.6e6),
    ("vgg11b", (32, 32, 3), 3, 1, 91.3e6),
    ("vgg8b", (96, 96, 3), 1, 1, 11.5e6),
])
def test_backbone_parameter_counts_match_paper(name, shape, feat_mult, num_layers, expected):
    config = kl.Config(feat_mult=feat_mult, num_layers=num_layers)
    model = kl.build_model(name, shape, 10, config)
    assert backbone_params(model) == pytest.approx(expected, rel=0.01)


def test_every_reference_architecture_is_registered():
    assert {"mlp", "vgg6a", "vgg6b", "vgg8", "vgg8a", "vgg8b", "vgg11", "vgg11b", "vgg13",
            "vgg16", "vgg19"} <= set(kl.list_models())


# 100+ local convs: building all their heads and metrics takes 10-30 s on 2 busy cores.
# The other deep residual networks (2-6 s each) repeat the code of a smaller one of their
# kind, which the default run builds: resnet18 (basic), resnet50 (bottleneck),
# wresnet10-8 and wresnet10-8a (wide, adapted wide). All build in pytest -m slow.
HEAVY = {"resnet34", "resnet101", "resnet152", "wresnet16-4", "wresnet16-4a", "wresnet16-8",
         "wresnet16-8a", "wresnet28-10", "wresnet28-10a", "wresnet40-10", "wresnet40-10a"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in kl.list_models()])
def test_every_registered_architecture_builds(name):
    model = kl.build_model(name, (32, 32, 3), 10, kl.Config(feat_mult=0.125, num_hidden=32))
    assert model(np.zeros((2, 32, 32, 3), "float32")).shape == (2, 10)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*vgg11b"):
        kl.build_model("resnet9", (32, 32, 3), 10)


def test_large_inputs_get_7x7_stride_2_stem():
    model = kl.build_model("vgg8b", (96, 96, 3), 10, kl.Config(feat_mult=0.125, num_hidden=16))
    stem = model.local_blocks[0]
    assert stem.encoder.kernel_size == (7, 7) and stem.encoder.strides == (2, 2)
    assert stem.compute_output_shape((None, 96, 96, 3)) == (None, 48, 48, 16)
    small = kl.build_model("vgg8b", (32, 32, 3), 10, kl.Config(feat_mult=0.125, num_hidden=16))
    assert small.local_blocks[0].encoder.kernel_size == (3, 3)


def test_no_batch_norm_removes_bn():
    model = kl.build_model("mlp", (8,), 3, kl.Config(batch_norm=False, num_hidden=4, num_layers=2))
    assert all(block.bn is None for block in model.local_blocks)
    assert not any("bn" in v.path for v in model.weights)


@pytest.mark.parametrize("channels,size,bound,expected", [
    (128, 28, 4096, (8, 4, 4, 0)),   # 128*4*7 = 3584
    (128, 32, 2048, (8, 8, 0, 0)),   # 128*4*4 = 2048
    (512, 3, 4096, (2, 1, 1, 0)),    # 512*2*3 = 3072: width untouched
    (256, 7, 1024, (4, 4, 2, 2)),    # 256*2*2 = 1024, pad (4*(2-1))//2 = 2
    (16, 4, 4096, (1, 1, 0, 0)),
])
def test_decoder_pool_geometry(channels, size, bound, expected):
    assert decoder_pool_geometry(channels, size, bound) == expected


@pytest.mark.parametrize("size,channels,bound", [
    (7, 1, 4),        # kernel 4, pad 2: the windows stop short of the far zero padding
    (28, 128, 1024),  # vgg8b's first block on 28x28: kernel 8, pad 4 on the near side only
    (14, 256, 1024),  # kernel 8 x 4, pads 1 and 2
    (5, 3, 12),       # kernel 2, pad 0: the last row and column are cut
])
def test_decoder_pooling_counts_padding_like_pytorch(size, channels, bound):
    """PyTorch's AvgPool2d(kernel, stride=kernel, padding=pad), zeros counted."""
    x = np.random.default_rng(0).normal(size=(2, size, size, channels)).astype("float32")
    pool = DecoderPooling(dim_in_decoder=bound)
    pool.build(x.shape)
    kernel_h, kernel_w, pad_h, pad_w = pool.geometry
    got = np.asarray(pool(x))
    out_h, out_w = (size + 2 * pad_h - kernel_h) // kernel_h + 1, (size + 2 * pad_w - kernel_w) // kernel_w + 1
    padded = np.pad(x, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
    windows = padded[:, :out_h * kernel_h, :out_w * kernel_w, :].reshape(
        2, out_h, kernel_h, out_w, kernel_w, channels)
    np.testing.assert_allclose(got, windows.mean(axis=(2, 4)), rtol=1e-5, atol=1e-6)
    assert got.shape == pool.compute_output_shape(x.shape)