"""Every layer round-trips through its config (as keras-hub's run_serialization_test):
config -> from_config -> config gives identical JSON, and the rebuilt layer with the same
weights gives identical outputs."""

import json

import keras
import numpy as np
import pytest

from keras_local.layers import (
    DecoderPooling,
    FeedbackAlignmentDense,
    LabelProjection,
    LocalBlock,
    PredHead,
    SimHead,
)

RNG = np.random.default_rng(0)
MAP = RNG.normal(size=(4, 6, 6, 5)).astype("float32")
VECTORS = RNG.normal(size=(4, 7)).astype("float32")
LABELS = np.eye(3, dtype="float32")[[0, 1, 2, 0]]

CASES = {
    "dense_block_predsim": (lambda: LocalBlock("dense", 8, 3, dropout=0.1, seed=5), VECTORS),
    "conv_block_pred": (lambda: LocalBlock("conv", 4, 3, local_loss="pred", nonlin="leakyrelu",
                                           dim_in_decoder=16, seed=7), MAP),
    "conv_block_bio": (lambda: LocalBlock("conv", 4, 3, bio=True, target_proj_size=6,
                                          dim_in_decoder=16, seed=9), MAP),
    "strided_block_no_heads": (lambda: LocalBlock("conv", 4, 3, kernel_size=7, strides=2,
                                                  local_loss=None, batch_norm=False), MAP),
    "pred_head_map": (lambda: PredHead(3, 16, seed=1), MAP),
    "pred_head_bio": (lambda: PredHead(3, 16, projection=LabelProjection(3, 6, seed=2), seed=3),
                      VECTORS),
    "sim_head_conv": (lambda: SimHead(16, seed=4), MAP),
    "sim_head_bio": (lambda: SimHead(16, projection=LabelProjection(3, 6, seed=2)), MAP),
    "decoder_pooling": (lambda: DecoderPooling(16), MAP),
    "feedback_dense": (lambda: FeedbackAlignmentDense(5, seed=6), VECTORS),
    "label_projection": (lambda: LabelProjection(3, 6, seed=8), LABELS),
}


def randomise(layer):
    """Nonzero weights everywhere (zero-initialised heads would hide a lost weight)."""
    for variable in layer.weights:
        if variable.dtype.startswith("float"):
            values = RNG.normal(size=variable.shape)
            if "variance" in variable.path:
                values = np.abs(values) + 0.5
            variable.assign(values.astype(variable.dtype))


def outputs(layer, inputs):
    if isinstance(layer, LocalBlock):
        return layer(inputs, training=False)
    return layer(inputs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_config_round_trip(name):
    make, inputs = CASES[name]
    layer = make()
    layer.build(inputs.shape)
    randomise(layer)
    config = layer.get_config()
    clone = type(layer).from_config(json.loads(json.dumps(config)))
    assert json.dumps(clone.get_config(), sort_keys=True) == json.dumps(config, sort_keys=True)
    clone.build(inputs.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(outputs(clone, inputs)),
                                  keras.ops.convert_to_numpy(outputs(layer, inputs)))
    # By registered name, as a saved model refers to it.
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer)


def test_block_local_loss_survives_round_trip():
    block = LocalBlock("conv", 4, 3, dim_in_decoder=16, seed=11)
    block.build(MAP.shape)
    randomise(block)
    clone = LocalBlock.from_config(block.get_config())
    clone.build(MAP.shape)
    clone.set_weights(block.get_weights())
    losses = []
    for layer in (block, clone):
        layer(MAP, training=False, labels=LABELS)
        losses.append(float(keras.ops.convert_to_numpy(layer.losses[0])))
    assert losses[0] == losses[1] and losses[0] > 0


def test_saved_model_carries_the_network_not_the_run(tmp_path):
    import zipfile

    import keras_local as kl
    from keras_local.data import get_dataset_info

    config = kl.Config(dataset="fashion_mnist_demo", data_dir="/secret/data/dir",
                       save_dir="/secret/save/dir", model="mlp", num_layers=1, num_hidden=8,
                       lr=0.123, epochs=7)
    model = kl.build_model("mlp", (28, 28, 1), 10, config)
    path = str(tmp_path / "m.keras")
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        stored = archive.read("config.json").decode()
    assert "/secret" not in stored and "save_dir" not in stored and "epochs" not in stored
    loaded = kl.load_model(path, compile=False)
    assert loaded.config.network_dict() == config.network_dict()
    assert loaded.preprocessing == {"dataset": "fashion_mnist_demo", "mean": [0.286],
                                    "std": [0.353], "class_names": list(
                                        get_dataset_info("fashion_mnist").class_names)}
