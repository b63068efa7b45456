"""Named architectures: the VGG channel lists of REFERENCE.md section 2 and the MLP.

A builder turns (input_shape, num_classes, config) into the ordered feature layers
of a LocalModel: LocalBlocks and parameter-free layers (max-pool, flatten).
"""

import functools

import keras

from keras_local.blocks import SEED_STRIDE, LocalBlock

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


def block_seed(config, index):
    return (config.seed * 1000 + index) * SEED_STRIDE


def _block_kwargs(config, num_classes):
    return dict(
        num_classes=num_classes,
        batch_norm=config.batch_norm,
        nonlin=config.nonlin,
        dropout=config.dropout,
        local_loss=None if config.backprop else config.loss_sup,
        beta=config.beta,
        dim_in_decoder=config.dim_in_decoder,
        bio=config.bio,
        target_proj_size=config.target_proj_size,
        dtype=config.precision,
    )


def _dense_blocks(config, num_classes, first_index):
    return [
        LocalBlock("dense", config.num_hidden, seed=block_seed(config, first_index + i),
                   name=f"block_{first_index + i}", **_block_kwargs(config, num_classes))
        for i in range(config.num_layers)
    ]


def mlp_layers(input_shape, num_classes, config):
    """``num_layers`` Dense local blocks of ``num_hidden`` units on the flattened input."""
    if config.num_layers < 1:
        raise ValueError("mlp needs num_layers >= 1")
    flatten = keras.layers.Flatten(dtype=config.precision, name="flatten")
    return [flatten] + _dense_blocks(config, num_classes, first_index=1)


def vgg_layers(name, input_shape, num_classes, config):
    """Conv local blocks and 2x2 max-pools per VGG_CHANNELS[name], channels times
    ``feat_mult``, then ``num_layers`` Dense local blocks."""
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
            seed=block_seed(config, index), name=f"block_{index}",
            **_block_kwargs(config, num_classes)))
    layers.append(keras.layers.Flatten(dtype=config.precision, name="flatten"))
    return layers + _dense_blocks(config, num_classes, first_index=index + 1)


ARCHITECTURES = {"mlp": mlp_layers}
ARCHITECTURES.update({name: functools.partial(vgg_layers, name) for name in VGG_CHANNELS})


def build_feature_layers(name, input_shape, num_classes, config):
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](tuple(input_shape), num_classes, config)
