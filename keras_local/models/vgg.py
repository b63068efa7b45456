"""VGG-style networks: the channel lists of docs/method.md section 5 ('M' = 2x2 max-pool)."""

import functools

from keras_local.models.common import block_kwargs, block_seed, dense_blocks
from keras_local.models.registry import register_model

VGG_CHANNELS = {
    "vgg6a": [128, "M", 256, "M", 512, "M", 512],
    "vgg6b": [128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg8": [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg8a": [128, 256, "M", 256, 512, "M", 512, "M", 512],
    "vgg8b": [128, 256, "M", 256, 512, "M", 512, "M", 512, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg11b": [128, 128, 128, 256, "M", 256, 512, "M", 512, 512, "M", 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}

# Inputs larger than this many pixels get a 7x7 stride-2 first conv (STL-10).
LARGE_INPUT_SIZE = 64


def vgg_layers(name, input_shape, num_classes, config):
    """Conv local blocks and 2x2 max-pools per VGG_CHANNELS[name], channels times
    ``feat_mult``, then ``num_layers`` Dense local blocks."""
    import keras

    from keras_local.layers.block import LocalBlock

    if len(input_shape) != 3:
        raise ValueError(f"{name} needs (height, width, channels) inputs, got {input_shape}")
    layers, index, pool_index = [], 0, 0
    for item in VGG_CHANNELS[name]:
        if item == "M":
            pool_index += 1
            layers.append(keras.layers.MaxPooling2D(2, dtype=config.precision,
                                                    name=f"pool_{pool_index}"))
            continue
        index += 1
        large_stem = index == 1 and input_shape[0] > LARGE_INPUT_SIZE
        layers.append(LocalBlock(
            "conv", int(item * config.feat_mult),
            kernel_size=7 if large_stem else 3, strides=2 if large_stem else 1,
            seed=block_seed(config, index), name=f"block_{index}", first_layer=index == 1,
            **block_kwargs(config, num_classes)))
    layers.append(keras.layers.Flatten(dtype=config.precision, name="flatten"))
    return layers + dense_blocks(config, num_classes, first_index=index + 1)


for _name in VGG_CHANNELS:
    register_model(_name, functools.partial(vgg_layers, _name))
