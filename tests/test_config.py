"""Config's two parts: the network (saved with a model) and the run (the run's config.json);
and what a model loaded from a file knows of them."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_local.config import (NETWORK_FIELDS, RUN_FIELDS, Config, NetworkConfig, RunConfig,
                                choices_of, network_part)

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def test_network_and_run_parts_split_config_without_overlap():
    names = [field.name for field in dataclasses.fields(Config)]
    assert sorted(NETWORK_FIELDS + RUN_FIELDS) == sorted(names)
    assert not set(NETWORK_FIELDS) & set(RUN_FIELDS)
    config = Config(model="mlp", num_hidden=8, epochs=3, lr=0.1, loss_unsup="sim")
    assert config.network_dict() == {**config.network().to_dict()}
    assert config.network_dict()["num_hidden"] == 8 and "epochs" not in config.network_dict()
    assert config.run_dict()["epochs"] == 3 and "num_hidden" not in config.run_dict()
    assert {**config.network_dict(), **config.run_dict()} == config.to_dict()
    assert isinstance(config, NetworkConfig) and isinstance(config, RunConfig)


@pytest.mark.parametrize("field", dataclasses.fields(Config), ids=lambda field: field.name)
def test_every_field_declares_its_help_and_group(field):
    assert field.metadata.get("help") and field.metadata.get("group"), field.name
    choices = choices_of(field)
    if choices is not None:
        assert Config().to_dict()[field.name] in choices


def test_options_that_build_the_blocks_are_network_options():
    """A block's unsupervised term, its weight and the similarity's form are built from
    these fields: a model file that left them out would load as another network."""
    assert {"loss_unsup", "alpha", "similarity_std"} <= set(NETWORK_FIELDS)


def test_a_network_part_refuses_run_options():
    with pytest.raises(ValueError, match=r"unknown config keys \['epochs'\]"):
        NetworkConfig.from_dict({"model": "mlp", "epochs": 3})
    assert NetworkConfig.from_dict(Config(num_hidden=8).network_dict()).num_hidden == 8


def test_config_imports_no_backend():
    check = ("import sys; from keras_local.config import Config; Config(); "
             "print([m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", check], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def _saved_and_loaded(tmp_path, config, compile=False):
    import keras_local as kl

    model = kl.build_model("mlp", (4, 4, 1), 3, config)
    path = tmp_path / "m.keras"
    model.save(path)
    return model, kl.load_model(path, compile=compile)


def test_a_loaded_model_keeps_its_network_and_holds_no_run_defaults(tmp_path):
    config = Config(model="mlp", num_layers=2, num_hidden=8, loss_unsup="recon", alpha=0.25,
                    similarity_std=False, lr=0.125, optim="sgd", epochs=3, jit_compile=False)
    model, loaded = _saved_and_loaded(tmp_path, config)
    assert type(loaded.config) is NetworkConfig
    assert loaded.config == config.network()
    for block in loaded.local_blocks:
        assert (block.unsup_loss_name, block.alpha, block.similarity_std) == \
            ("unsup_recon", 0.25, False), block.name
    with pytest.raises(AttributeError):
        loaded.config.lr  # not the default 5e-4: a loaded model has no run options


def test_compiling_a_loaded_model_needs_its_optimiser(tmp_path):
    import keras

    config = Config(model="mlp", num_layers=1, num_hidden=8, jit_compile=False)
    _, loaded = _saved_and_loaded(tmp_path, config)
    with pytest.raises(ValueError, match="optimizer"):
        loaded.compile()
    loaded.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    x = np.random.default_rng(0).normal(size=(8, 4, 4, 1)).astype("float32")
    loaded.train_on_batch(x, np.arange(8) % 3)
    assert int(loaded.optimizer.iterations) == 1


def test_an_older_model_file_with_run_options_loads_its_network_only():
    """Model files written before the split held the whole Config."""
    from keras_local.models.local_model import LocalModel

    config = Config(model="mlp", num_layers=1, num_hidden=8, loss_unsup="sim", epochs=3)
    model = LocalModel.from_config({"architecture": "mlp", "input_shape": [4, 4, 1],
                                    "num_classes": 3, "config": config.to_dict()})
    assert type(model.config) is NetworkConfig and model.config == config.network()
    with pytest.raises(ValueError, match=r"unknown config keys \['colour'\]"):
        network_part({**config.to_dict(), "colour": "red"})
