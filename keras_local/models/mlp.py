"""The multilayer perceptron: ``num_layers`` Dense local blocks on the flattened input."""

from keras_local.models.common import dense_blocks
from keras_local.models.registry import register_model


@register_model("mlp")
def mlp_layers(input_shape, num_classes, config):
    """``num_layers`` Dense local blocks of ``num_hidden`` units on the flattened input."""
    import keras

    if config.num_layers < 1:
        raise ValueError("mlp needs num_layers >= 1")
    flatten = keras.layers.Flatten(dtype=config.precision, name="flatten")
    return [flatten] + dense_blocks(config, num_classes, first_index=1)
