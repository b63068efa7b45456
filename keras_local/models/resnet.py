"""ResNets and wide ResNets of the authors' script (docs/method.md section 6), every
convolution a local block (``keras_local.layers.residual.ResidualConv``).

- ``resnet18/34`` (BasicBlock: two 3x3 convs), ``resnet50/101/152`` (Bottleneck: 1x1, 3x3,
  1x1, expansion 4): CIFAR form, stem 3x3 conv of 64 x feat_mult channels, stages of
  [64, 128, 256, 512] x feat_mult with strides 1, 2, 2, 2, convs without bias, shortcut
  1x1 conv + BN when the shape changes; then average pooling over the final map (the
  script's 4x4 pool on 32x32 inputs) and the output Dense. ``pre_act``: BasicBlock convs
  become BN -> act -> conv and the stem a plain conv (the script's Bottleneck ignores it).
- ``wresnetD-W`` (depth D = 6n + 4, width W): pre-activation ``wide_basic`` blocks with
  biases, stem conv without BN in its output path, 1x1 conv shortcut with bias, dropout
  between the two convs; final BN -> ReLU -> 8x8 average pool -> Dense. ``wresnetD-Wa``
  (adapted): the stem and first stage have 16 W channels, dropout (spatial) before each
  conv instead of between them, and a 2x2 max pool before the Dense (4x4 x 64 W inputs).

Inputs larger than 64 pixels get a 7x7 stride-2 stem, as the VGGs do (not in the script,
whose ResNets are CIFAR-only).
"""

import functools

from keras_local.models.common import block_kwargs, block_seed
from keras_local.models.registry import register_model

# name -> (block type, blocks per stage)
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
# name -> (depth, widen factor); each also registered with suffix "a" (adapted)
WIDE_RESNETS = {
    "wresnet10-8": (10, 8),
    "wresnet16-4": (16, 4),
    "wresnet16-8": (16, 8),
    "wresnet28-10": (28, 10),
    "wresnet40-10": (40, 10),
}
LARGE_INPUT_SIZE = 64


class _Convs:
    """Numbers the local convs of a network (block_1, block_2, ...) and builds them."""

    def __init__(self, config, num_classes, input_shape):
        self.config, self.num_classes, self.index = config, num_classes, 0
        self.large = input_shape[0] > LARGE_INPUT_SIZE

    def __call__(self, width, kernel_size=3, strides=1, **options):
        from keras_local.layers.residual import ResidualConv

        self.index += 1
        kwargs = block_kwargs(self.config, self.num_classes)
        kwargs.update(options)
        if self.index == 1 and self.large:
            kernel_size, strides = 7, 2
        return ResidualConv(int(width), kernel_size=kernel_size, strides=strides,
                            seed=block_seed(self.config, self.index),
                            name=f"block_{self.index}", **kwargs)


def _check_input(name, input_shape):
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs (height, width, channels) inputs, got {input_shape}")


def resnet_layers(name, input_shape, num_classes, config):
    """The feature layers of ``RESNETS[name]`` (module docstring)."""
    import keras

    _check_input(name, input_shape)
    kind, counts = RESNETS[name]
    expansion = EXPANSION[kind]
    conv = _Convs(config, num_classes, input_shape)
    pre = kind == "basic" and config.pre_act
    layers = [conv(64 * config.feat_mult, use_bias=False, order="none" if config.pre_act
                   else "post")]
    in_planes = int(64 * config.feat_mult)
    for stage, (planes, first_stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
        planes = int(planes * config.feat_mult)
        for index in range(counts[stage]):
            stride = first_stride if index == 0 else 1
            out = planes * expansion
            shortcut = "conv_bn" if stride != 1 or in_planes != out else "identity"
            common = dict(use_bias=False, order="pre" if pre else "post")
            if kind == "basic":
                layers += [conv(planes, 3, stride, role="first", **common),
                           conv(planes, 3, 1, role="last", shortcut=shortcut,
                                shortcut_strides=stride, **common)]
            else:
                layers += [conv(planes, 1, 1, role="first", **common),
                           conv(planes, 3, stride, role="middle", **common),
                           conv(out, 1, 1, role="last", shortcut=shortcut,
                                shortcut_strides=stride, **common)]
            in_planes = out
    layers.append(keras.layers.GlobalAveragePooling2D(dtype=config.precision, name="pool"))
    return layers


def wide_resnet_layers(depth, widen, adapted, input_shape, num_classes, config):
    """The feature layers of the script's ``Wide_ResNet(depth, widen, adapted)``."""
    import keras

    name = f"wresnet{depth}-{widen}{'a' if adapted else ''}"
    _check_input(name, input_shape)
    if (depth - 4) % 6:
        raise ValueError(f"wide ResNet depth must be 6n + 4, got {depth}")
    blocks_per_stage = (depth - 4) // 6
    stages = ([16 * widen, 16 * widen, 32 * widen, 64 * widen] if adapted
              else [16, 16 * widen, 32 * widen, 64 * widen])
    stages = [max(1, int(channels * config.feat_mult)) for channels in stages]
    conv = _Convs(config, num_classes, input_shape)
    layers = [conv(stages[0], order="none", use_bias=True, dropout=0.0)]
    in_planes = stages[0]
    # adapted: the script's conv dropout (spatial, before each conv); else an ordinary
    # dropout between the two convs of a block.
    common = dict(order="pre", use_bias=True, dropout=config.dropout if adapted else 0.0)
    for planes, first_stride in zip(stages[1:], (1, 2, 2)):
        for index in range(blocks_per_stage):
            stride = first_stride if index == 0 else 1
            shortcut = "conv" if stride != 1 or in_planes != planes else "identity"
            layers += [conv(planes, 3, 1, role="first",
                            output_dropout=0.0 if adapted else config.dropout, **common),
                       conv(planes, 3, stride, role="last", shortcut=shortcut,
                            shortcut_strides=stride, shortcut_bias=True, **common)]
            in_planes = planes
    # Final BN (PyTorch momentum 0.9 = Keras momentum 0.1) -> ReLU -> pool.
    layers += [keras.layers.BatchNormalization(momentum=0.1, epsilon=1e-5,
                                               dtype=config.precision, name="final_bn"),
               keras.layers.ReLU(dtype=config.precision, name="final_act")]
    if adapted:
        layers += [keras.layers.MaxPooling2D(2, dtype=config.precision, name="pool"),
                   keras.layers.Flatten(dtype=config.precision, name="flatten")]
    else:
        layers.append(keras.layers.GlobalAveragePooling2D(dtype=config.precision, name="pool"))
    return layers


for _name in RESNETS:
    register_model(_name, functools.partial(resnet_layers, _name))
for _name, (_depth, _widen) in WIDE_RESNETS.items():
    register_model(_name, functools.partial(wide_resnet_layers, _depth, _widen, False))
    register_model(_name + "a", functools.partial(wide_resnet_layers, _depth, _widen, True))
