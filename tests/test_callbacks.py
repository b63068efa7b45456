"""TensorBoard pictures of the method: per-block similarity images and the run's HParams,
read back from the event files of a tiny run."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from keras_local.callbacks import class_sorted_sample, hparam_values, similarity_picture

pytestmark = pytest.mark.tensorflow_only

EXAMPLES, SCALE = 20, 4  # tiny_runs' similarity_examples; SimilarityImages' default scale


def event_tensors(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    return accumulator


def decode(event):
    width, height, png = event.tensor_proto.string_val
    with Image.open(io.BytesIO(png)) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.shape == (int(height), int(width), 3)
    return pixels


def test_class_sorted_sample_balances_classes_and_sorts_them():
    labels = np.array([3, 3, 0, 1, 3, 0, 2, 3, 1, 0, 3, 3])
    chosen = class_sorted_sample(labels, 7)
    assert list(labels[chosen]) == [0, 0, 1, 1, 2, 3, 3]
    assert list(chosen) == [2, 5, 3, 8, 6, 0, 1]  # the first examples of each class


def test_similarity_picture_puts_output_beside_labels():
    similarity = np.array([[1.0, -1.0], [-1.0, 1.0]])
    picture = similarity_picture(similarity, np.eye(2), scale=3)
    assert picture.shape == (6, 2 * 6 + 6, 3) and picture.dtype == np.uint8
    red, blue = picture[0, 0], picture[0, 3]
    assert red[0] > 2 * red[2] and blue[2] > 2 * blue[0]
    np.testing.assert_array_equal(picture[:, 6:12], 255)  # white gap
    np.testing.assert_array_equal(picture[0, 12], red)


@pytest.mark.parametrize("mode", ["predsim", "backprop"])
def test_one_similarity_image_per_block_per_epoch(tiny_runs, mode):
    accumulator = event_tensors(os.path.join(tiny_runs[mode], "logs", "similarity"))
    tags = accumulator.Tags()["tensors"]
    assert sorted(tags) == ["similarity/block_1", "similarity/block_2"]
    for tag in tags:
        events = accumulator.Tensors(tag)
        assert [event.step for event in events] == [0, 1]
        pixels = decode(events[-1])
        size = EXAMPLES * SCALE
        assert pixels.shape == (size, 2 * size + 2 * SCALE, 3)
        output, labels = pixels[:, :size], pixels[:, size + 2 * SCALE:]
        # S(h) has 1 on its diagonal, like the label similarity, and differs elsewhere.
        np.testing.assert_array_equal(output[::SCALE, ::SCALE][np.diag_indices(EXAMPLES)],
                                      labels[::SCALE, ::SCALE][np.diag_indices(EXAMPLES)])
        assert not np.array_equal(output, labels)
        # Sorted by class: label blocks along the diagonal, 2 examples of each class.
        same_class = labels[::SCALE, ::SCALE][0]
        np.testing.assert_array_equal(same_class[1], same_class[0])
        assert not np.array_equal(same_class[2], same_class[0])


def test_run_configuration_in_the_hparams_dashboard(tiny_runs):
    from keras_local.config import Config
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = tiny_runs["backprop"]
    accumulator = event_tensors(os.path.join(run_dir, "logs"))
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert session.group_name == os.path.basename(run_dir)
    hparams = session.hparams
    assert hparams["model"].string_value == "mlp"
    assert hparams["training_mode"].string_value == "backprop"
    assert hparams["num_hidden"].number_value == 16
    assert hparams["backprop"].bool_value is True
    assert hparams["lr_decay_milestones"].string_value == "200 300 350 375"
    assert "data_dir" not in hparams  # None: left out
    assert set(hparams) == set(hparam_values(Config(max_train_examples=256)))


def test_epoch_seconds_include_the_work_between_epochs():
    """EpochTimes: epoch 1 from the fit's start; every later epoch from the previous
    epoch's end, so a slow epoch-end callback (a checkpoint) counts in the next epoch."""
    import time

    import keras

    from keras_local.callbacks import EpochTimes

    class SlowEpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            time.sleep(0.3)

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((4, 2), "float32")
    history = model.fit(x, x[:, :1], epochs=3, verbose=0,
                        callbacks=[EpochTimes(), SlowEpochEnd()]).history
    seconds = history["epoch_seconds"]
    assert len(seconds) == 3  # the first one includes tracing: no bound
    assert all(s >= 0.3 for s in seconds[1:]), seconds


@pytest.mark.parametrize("model", ["resnet18", "wresnet10-8a"])
def test_similarity_images_of_residual_networks(tmp_path, model):
    """Residual convs hand (output, block input) to the next conv: each block's picture is
    of its output, one row and column per example."""
    import keras

    from keras_local.callbacks import SimilarityImages
    from keras_local.config import Config
    from keras_local.training import build_model

    config = Config(dataset="cifar10", model=model, feat_mult=0.125, jit_compile=False,
                    backend=keras.backend.backend())
    network = build_model(model, (32, 32, 3), 10, config)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 32, 32, 3)).astype("float32")
    network(images)
    callback = SimilarityImages(str(tmp_path), images, np.arange(8) % 4, 10, scale=1)
    callback.set_model(network)
    callback.on_train_begin()
    callback.on_epoch_end(0)
    callback.on_train_end()
    accumulator = event_tensors(str(tmp_path))
    tags = accumulator.Tags()["tensors"]
    assert len(tags) == len(network.local_blocks) > 2
    for tag in tags:
        assert decode(accumulator.Tensors(tag)[0]).shape == (8, 2 * 8 + 2, 3)
