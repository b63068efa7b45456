"""The paper's recipes by name (keras_local.recipes) and train.py's --recipe/--list-recipes."""

import json
import os
import subprocess
import sys

import pytest

from keras_local.recipes import RECIPES, apply_recipe, find_recipe, get_recipe

from helpers import ROOT, train_main


# docs/method.md section 10, row by row: (recipe, epochs, first milestone, lr, dropout,
# dim_in_decoder or None for the default 4096, feat_mult).
SECTION_5 = [
    ("mnist-mlp-predsim", 100, 50, 5e-4, 0.1, None, 1.0),
    ("mnist-vgg8b-predsim", 100, 50, 5e-4, 0.2, 1024, 1.0),
    ("fashion_mnist-mlp-predsim", 200, 100, 5e-4, 0.025, None, 1.0),
    ("fashion_mnist-vgg8b-predsim", 200, 100, 5e-4, 0.1, 1024, 1.0),
    ("kmnist-vgg8b-predsim", 100, 50, 5e-4, 0.3, 1024, 1.0),
    ("cifar10-vgg8b-predsim", 400, 200, 5e-4, 0.2, 2048, 1.0),
    ("cifar10-vgg11b-predsim", 400, 200, 5e-4, 0.2, 2048, 1.0),
    ("cifar10-vgg11b-3x-predsim", 400, 200, 3e-4, 0.3, None, 3.0),
]


@pytest.mark.parametrize("name,epochs,milestone,lr,dropout,dim,feat_mult", SECTION_5)
def test_reference_section_5_rows(name, epochs, milestone, lr, dropout, dim, feat_mult):
    options = get_recipe(name).options
    assert (options["epochs"], options["lr_decay_milestones"][0], options["lr"],
            options["dropout"], options.get("dim_in_decoder"), options.get("feat_mult", 1.0),
            options["nonlin"], options["loss_sup"]) == (
        epochs, milestone, lr, dropout, dim, feat_mult, "leakyrelu", "predsim")


def test_every_published_number_is_a_recipe():
    assert len(RECIPES) == 19 * 4 + 6
    assert get_recipe("cifar10-vgg11b-predsim").published_error == 5.30
    assert get_recipe("stl10-vgg8b-cutout-predsim").published_error == 19.25
    assert get_recipe("cifar10-mlp-backprop").options["num_hidden"] == 3000
    assert get_recipe("cifar100-vgg11b-sim").options["classes_per_batch_until_epoch"] == 200
    assert "classes_per_batch" not in get_recipe("cifar100-vgg11b-pred").options
    assert get_recipe("kmnist-vgg8b-cutout-predsim").options["dropout"] == 0.15


def test_explicit_options_override_a_recipe():
    values, note = apply_recipe(dict(dataset="cifar10", model="vgg8b", dropout=0.5, lr=1.0),
                                explicit={"dropout"}, name="fashion_mnist-mlp-predsim")
    assert values["dropout"] == 0.5 and values["lr"] == 5e-4 and values["model"] == "mlp"
    assert values["recipe"] == "fashion_mnist-mlp-predsim with changes: dropout"
    assert note.startswith("recipe fashion_mnist-mlp-predsim with your changes: dropout 0.5 "
                           "(recipe: 0.025) (its published test error 8.54% is for the recipe "
                           "unchanged)")


def test_the_matching_recipe_applies_unless_none():
    run = dict(dataset="cifar10", model="vgg11b", feat_mult=1.0, cutout=False,
               loss_sup="predsim", backprop=False, dropout=0.0)
    values, note = apply_recipe(run, explicit={"dataset", "model"})
    assert values["recipe"] == "cifar10-vgg11b-predsim" and values["dropout"] == 0.2
    assert note.startswith("using the paper's recipe cifar10-vgg11b-predsim") and "5.30%" in note
    assert apply_recipe(run, explicit=set(), name="none") == (run, None)
    assert find_recipe(dict(run, backprop=True)).name == "cifar10-vgg11b-backprop"
    assert find_recipe(dict(run, feat_mult=2.0)).name == "cifar10-vgg11b-2x-predsim"
    assert find_recipe(dict(run, bio=True)) is None
    assert find_recipe(dict(run, dataset="fashion_mnist_demo")) is None


def test_unknown_recipe_is_one_line_exit_2(capsys):
    assert train_main(["--recipe", "cifar10-vgg99-predsim"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("keras-local-train: error: unknown recipe 'cifar10-vgg99-predsim'; "
                          "choose one of none, mnist-mlp-backprop")


def test_list_recipes_cli():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--list-recipes"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 + len(RECIPES)
    row = next(line for line in lines if line.startswith("cifar10-vgg11b-3x-predsim "))
    assert row.split()[1] == "3.97" and "--feat-mult 3 " in row and "--lr 0.0003" in row


@pytest.mark.slow  # a train.py run on the full Fashion-MNIST files; CI runs it
def test_fashion_mnist_mlp_recipe_trains_one_epoch(tmp_path, fashion_mnist_dir):
    code = train_main([
        "--recipe", "fashion_mnist-mlp-predsim", "--epochs", "1", "--num-hidden", "64",
        "--max-train-examples", "512", "--data-dir", fashion_mnist_dir,
        "--save-dir", str(tmp_path), "--no-export", "--quiet"])
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["recipe"], config["num_layers"], config["num_hidden"], config["dropout"],
            config["nonlin"], config["epochs"]) == (
        "fashion_mnist-mlp-predsim with changes: epochs", 3, 64, 0.025, "leakyrelu", 1)
    # 4 steps of a predsim output layer (its loss weighted 1 - beta): only check it ran.
    assert 0.0 <= json.loads((run_dir / "results.json").read_text())["test_error"] <= 100.0


def cli_recipe(argv):
    """(Config values, note) that train.py derives from ``argv``, without training."""
    from keras_local.cli.train import parse_args, recipe_config_values

    return recipe_config_values(parse_args(argv), argv)


def test_a_recipe_changed_by_flags_says_so_and_is_not_recorded_as_is():
    values, note = cli_recipe(["--recipe", "mnist-mlp-predsim", "--dataset",
                               "fashion_mnist_demo", "--model", "vgg8b", "--backprop"])
    assert note == ("recipe mnist-mlp-predsim with your changes: dataset fashion_mnist_demo "
                    "(recipe: mnist), model vgg8b (recipe: mlp), method backprop (recipe: "
                    "predsim) (its published test error 0.62% is for the recipe unchanged)")
    assert values["recipe"] == "mnist-mlp-predsim with changes: dataset, model, method"
    assert values["lr"] == 5e-4 and values["dropout"] == 0.1  # the rest is the recipe's
    # Flags equal to the recipe's values change nothing.
    values, note = cli_recipe(["--recipe", "mnist-mlp-predsim", "--dataset", "mnist",
                               "--lr", "0.0005"])
    assert values["recipe"] == "mnist-mlp-predsim"
    assert note == "using the paper's recipe mnist-mlp-predsim (published test error 0.62%)"


def test_shorter_epochs_scale_the_recipe_milestones():
    values, note = cli_recipe(["--recipe", "fashion_mnist-mlp-predsim", "--epochs", "40"])
    assert values["lr_decay_milestones"] == (20, 30, 35, 37)  # of 100 150 175 188 / 200
    assert note.endswith("; its lr milestones scaled to 40 epochs: 20 30 35 37")
    assert "epochs 40 (recipe: 200)" in note
    # The matched recipe (no --recipe) too; a 1-epoch run keeps its learning rate.
    values, note = cli_recipe(["--dataset", "mnist", "--model", "mlp", "--epochs", "1"])
    assert values["recipe"] == "mnist-mlp-predsim with changes: epochs"
    assert values["lr_decay_milestones"] == (1, 1, 1, 1)
    # Explicit milestones, or a longer run, keep what was asked.
    values, _ = cli_recipe(["--recipe", "fashion_mnist-mlp-predsim", "--epochs", "40",
                            "--lr-decay-milestones", "10", "30"])
    assert values["lr_decay_milestones"] == (10, 30)
    values, _ = cli_recipe(["--recipe", "fashion_mnist-mlp-predsim", "--epochs", "300"])
    assert values["lr_decay_milestones"] == (100, 150, 175, 188)
