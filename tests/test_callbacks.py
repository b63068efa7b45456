"""What TensorBoard shows of a run: scalars grouped per block, per-block similarity images
and the run's HParams, read back from the event files of tiny runs."""

import csv
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from keras_local.run.callbacks import class_sorted_sample, hparam_values, similarity_picture

pytestmark = pytest.mark.tensorflow_only

EXAMPLES, SCALE = 20, 4  # tiny_runs' similarity_examples; SimilarityImages' default scale
# Every option at its default but the size of the run (XLA and similarity images stay on).
CLI_TINY = ["--dataset", "fashion_mnist_demo", "--model", "mlp", "--num-layers", "2",
            "--num-hidden", "16", "--max-train-examples", "256", "--batch-size", "64",
            "--epochs", "2", "--no-export", "--quiet"]


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


def scalars(log_dir):
    """{tag: [(step, value), ...]} of the scalars in one TensorBoard run directory."""
    import tensorflow as tf

    accumulator = event_tensors(log_dir)
    return {tag: [(event.step, float(tf.make_ndarray(event.tensor_proto)))
                  for event in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"]}


def hparams_session(run_dir):
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = event_tensors(os.path.join(run_dir, "logs"))
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The run directory of a tiny 2-epoch run of train.py (2 local blocks)."""
    from keras_local.cli.train import main as train_main

    save_dir = tmp_path_factory.mktemp("cli_run")
    assert train_main([*CLI_TINY, "--save-dir", str(save_dir)]) == 0
    (run_dir,) = save_dir.iterdir()
    return str(run_dir)


BLOCK_TAGS = [f"block_{k}/{metric}" for k in (1, 2)
              for metric in ("pred_loss", "sim_loss", "error")]


def test_scalars_grouped_one_section_per_block(cli_run):
    train = scalars(os.path.join(cli_run, "logs", "train"))
    validation = scalars(os.path.join(cli_run, "logs", "validation"))
    assert sorted(train) == sorted(["epoch_loss", "epoch_error", "epoch_learning_rate",
                                    "time/epoch_seconds", *BLOCK_TAGS])
    # The evaluation reports the network's loss and error only.
    assert sorted(validation) == sorted(["epoch_loss", "epoch_error",
                                         "evaluation_loss_vs_iterations",
                                         "evaluation_error_vs_iterations"])
    # TensorBoard's sections are the prefixes before a "/": one per block, none per metric.
    for tag in [*train, *validation]:
        assert "block" not in tag or re.fullmatch(r"block_\d/\w+", tag), tag
        assert not tag.startswith("epoch_epoch_"), tag
    # Only the tags changed: history.csv keeps Keras's names, and the values are the same.
    with open(os.path.join(cli_run, "history.csv"), newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert {"block_1_pred_loss", "block_2_error", "epoch_seconds"} <= set(rows[0])
    for series, tag, column in [(train, "block_2/sim_loss", "block_2_sim_loss"),
                                (train, "block_1/error", "block_1_error"),
                                (train, "time/epoch_seconds", "epoch_seconds"),
                                (train, "epoch_loss", "loss"),
                                (validation, "epoch_error", "val_error")]:
        assert [step for step, _ in series[tag]] == [0, 1], tag
        np.testing.assert_allclose([value for _, value in series[tag]],
                                   [float(row[column]) for row in rows], rtol=1e-6)


def test_hparams_are_the_options_that_define_the_experiment(cli_run):
    hparams = hparams_session(cli_run).hparams
    assert sorted(hparams) == sorted([
        "training_mode", "dataset", "max_train_examples", "cutout", "classes_per_batch",
        "model", "num_layers", "num_hidden", "feat_mult", "batch_norm", "nonlin", "dropout",
        "dim_in_decoder", "pre_act", "loss_sup", "beta", "bio", "alpha", "loss_unsup",
        "similarity_std", "batch_size", "epochs", "lr", "lr_decay_milestones",
        "lr_decay_fact", "optim", "weight_decay", "seed", "precision", "pipeline"])
    assert hparams["training_mode"].string_value == "predsim"
    assert hparams["dataset"].string_value == "fashion_mnist_demo"
    assert hparams["max_train_examples"].number_value == 256
    assert hparams["epochs"].number_value == 2
    assert hparams["lr"].number_value == pytest.approx(5e-4)
    assert hparams["lr_decay_milestones"].string_value == "200 300 350 375"


def test_hparams_show_an_option_only_where_it_acts():
    from keras_local.config import Config

    plain = hparam_values(Config())
    assert not {"length", "momentum", "target_proj_size", "classes_per_batch_until_epoch",
                "recipe", "max_train_examples", "image_size", "modules"} & set(plain)
    changed = hparam_values(Config(cutout=True, optim="sgd", momentum=0.9, bio=True,
                                   classes_per_batch=2, classes_per_batch_until_epoch=5,
                                   modules=2, recipe="cifar10_vgg8b_predsim"))
    assert {key: changed[key] for key in set(changed) - set(plain)} == {
        "length": 16, "momentum": 0.9, "target_proj_size": 128,
        "classes_per_batch_until_epoch": 5, "modules": 2, "recipe": "cifar10_vgg8b_predsim"}


def test_tensorboard_tags_of_keras_names():
    from keras_local.run.callbacks import tensorboard_tag

    assert tensorboard_tag("epoch_block_12_recon_loss") == "block_12/recon_loss"
    assert tensorboard_tag("epoch_block_1_error") == "block_1/error"
    assert tensorboard_tag("epoch_epoch_seconds") == "time/epoch_seconds"
    for kept in ("epoch_loss", "epoch_learning_rate", "evaluation_loss_vs_iterations",
                 "epoch_blocks_seen"):
        assert tensorboard_tag(kept) == kept


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


def test_run_configuration_in_the_hparams_dashboard(tiny_runs, cli_run):
    run_dir = tiny_runs["backprop"]
    session = hparams_session(run_dir)
    assert session.group_name == os.path.basename(run_dir)
    hparams = session.hparams
    assert hparams["model"].string_value == "mlp"
    assert hparams["training_mode"].string_value == "backprop"
    assert hparams["num_hidden"].number_value == 16
    assert hparams["batch_size"].number_value == 64
    # Run through run() without XLA and with 20 similarity images, it has the columns of the
    # CLI run: how a run executes and what it logs are no HParams.
    assert set(hparams) == set(hparams_session(cli_run).hparams)
    assert not {"data_dir", "save_dir", "class_names", "data_mean", "backend", "strategy",
                "jit_compile", "similarity_examples", "backprop"} & set(hparams)


def test_epoch_seconds_include_the_work_between_epochs():
    """EpochTimes: epoch 1 from the fit's start; every later epoch from the previous
    epoch's end, so a slow epoch-end callback (a checkpoint) counts in the next epoch."""
    import time

    import keras

    from keras_local.run.callbacks import EpochTimes

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

    from keras_local.run.callbacks import SimilarityImages
    from keras_local.config import Config
    from keras_local.run.training import build_model

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


def test_random_streams_reads_its_variables_without_a_warning():
    """RandomStreams reads every SeedGenerator and the step counter once per batch:
    through keras.ops.convert_to_numpy a TensorFlow variable makes NumPy 2 warn each time."""
    import warnings

    import keras_local as kl
    from keras_local.run.callbacks import RandomStreams

    config = kl.Config(num_layers=2, num_hidden=16, dropout=0.1, jit_compile=False)
    model = kl.build_model("mlp", (6, 6, 1), 4, config)
    model.compile()
    streams = RandomStreams()
    streams.set_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        streams.on_train_begin()
        streams.on_train_batch_begin(0)
    assert streams.generators, "the dropout model has SeedGenerators to set"
