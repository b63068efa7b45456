"""The paper's recipes by name: every row of its result tables with the options that gave it.

Options are those of the authors' ``run_experiments.sh`` (public repository
anokland/local-loss), one command per published number; errors are their README's
tables. Options not named by a recipe keep the reference script's defaults, which are
``Config``'s (batch 128, Adam, lr decay factor 0.25, beta 0.99, ...). The "bio" commands
of that script are not here: their numbers are not in those tables.

A row's four methods follow one pattern: ``backprop`` (global loss, ReLU), ``pred``
(ReLU, the row's ``dim_in_decoder``), ``sim`` (LeakyReLU, and on CIFAR-100 batches of 20
classes until epoch 200) and ``predsim`` (LeakyReLU, the row's ``dim_in_decoder``, the
same class-limited batches). Cutout rows are predsim only.
"""

import dataclasses

METHODS = ("backprop", "pred", "sim", "predsim")

SCHEDULE_100 = dict(epochs=100, lr_decay_milestones=(50, 75, 89, 94))
SCHEDULE_200 = dict(epochs=200, lr_decay_milestones=(100, 150, 175, 188))
SCHEDULE_400 = dict(epochs=400, lr_decay_milestones=(200, 300, 350, 375))
MLP_3 = dict(num_layers=3)
MLP_3X3000 = dict(num_layers=3, num_hidden=3000)
CLASS_LIMITED = dict(classes_per_batch=20, classes_per_batch_until_epoch=200)

# (dataset, model, feat_mult, options shared by the row, dim_in_decoder of pred/predsim
#  or None, published errors backprop / pred / sim / predsim, extra options of sim and
#  predsim, cutout row as (options beyond predsim's, error) or None)
ROWS = [
    ("mnist", "mlp", 1, dict(SCHEDULE_100, **MLP_3, lr=5e-4, dropout=0.1), None,
     (0.75, 0.68, 0.80, 0.62), {}, None),
    ("mnist", "vgg8b", 1, dict(SCHEDULE_100, lr=5e-4, dropout=0.2), 1024,
     (0.26, 0.40, 0.65, 0.31), {}, (dict(cutout=True, length=14), 0.26)),
    ("fashion_mnist", "mlp", 1, dict(SCHEDULE_200, **MLP_3, lr=5e-4, dropout=0.025), None,
     (8.37, 8.60, 9.70, 8.54), {}, None),
    ("fashion_mnist", "vgg8b", 1, dict(SCHEDULE_200, lr=5e-4, dropout=0.1), 1024,
     (4.53, 5.66, 5.12, 4.65), {}, None),
    ("fashion_mnist", "vgg8b", 2, dict(SCHEDULE_200, lr=3e-4, dropout=0.2), None,
     (4.55, 5.11, 4.92, 4.33), {}, (dict(cutout=True, length=14), 4.14)),
    ("kmnist", "mlp", 1, dict(SCHEDULE_100, **MLP_3, lr=5e-4, dropout=0.2), None,
     (5.99, 7.26, 9.80, 7.33), {}, None),
    ("kmnist", "vgg8b", 1, dict(SCHEDULE_100, lr=5e-4, dropout=0.3), 1024,
     (1.53, 2.22, 2.19, 1.36), {}, (dict(cutout=True, length=14, dropout=0.15), 0.99)),
    ("cifar10", "mlp", 1, dict(SCHEDULE_400, **MLP_3X3000, lr=5e-4, dropout=0.1), None,
     (33.56, 32.33, 33.48, 30.93), {}, None),
    ("cifar10", "vgg8b", 1, dict(SCHEDULE_400, lr=5e-4, dropout=0.2), 2048,
     (5.99, 8.40, 7.16, 5.58), {}, None),
    ("cifar10", "vgg11b", 1, dict(SCHEDULE_400, lr=5e-4, dropout=0.2), 2048,
     (5.56, 8.39, 6.70, 5.30), {}, None),
    ("cifar10", "vgg11b", 2, dict(SCHEDULE_400, lr=3e-4, dropout=0.25), None,
     (4.91, 7.30, 6.66, 4.42), {}, None),
    ("cifar10", "vgg11b", 3, dict(SCHEDULE_400, lr=3e-4, dropout=0.3), None,
     (5.02, 7.37, 9.34, 3.97), {}, (dict(cutout=True, length=16), 3.60)),
    ("cifar100", "mlp", 1, dict(SCHEDULE_400, **MLP_3X3000, lr=5e-4, dropout=0.025), None,
     (62.57, 58.87, 62.46, 56.88), CLASS_LIMITED, None),
    ("cifar100", "vgg8b", 1, dict(SCHEDULE_400, lr=5e-4, dropout=0.05), None,
     (26.24, 29.32, 32.64, 24.07), CLASS_LIMITED, None),
    ("cifar100", "vgg11b", 1, dict(SCHEDULE_400, lr=5e-4, dropout=0.05), None,
     (25.18, 29.58, 30.82, 24.05), CLASS_LIMITED, None),
    ("cifar100", "vgg11b", 2, dict(SCHEDULE_400, lr=3e-4, dropout=0.1), None,
     (23.44, 26.91, 28.03, 21.20), CLASS_LIMITED, None),
    ("cifar100", "vgg11b", 3, dict(SCHEDULE_400, lr=3e-4, dropout=0.15), None,
     (23.69, 25.90, 28.01, 20.13), CLASS_LIMITED, None),
    ("svhn", "vgg8b", 1, dict(SCHEDULE_100, lr=3e-4, dropout=0.3), 2048,
     (2.29, 2.12, 1.89, 1.74), {}, (dict(cutout=True, length=16, dropout=0.15), 1.65)),
    ("stl10", "vgg8b", 1, dict(SCHEDULE_400, lr=5e-4, dropout=0.1), 2048,
     (33.08, 26.83, 23.15, 20.51), {}, (dict(cutout=True, length=48), 19.25)),
]


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    method: str          # backprop, pred, sim, predsim
    published_error: float
    options: dict        # Config fields this row sets

    def flags(self):
        """The row as keras-local-train flags."""
        parts = []
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                parts.append(flag)
            elif isinstance(value, tuple):
                parts.append(f"{flag} {' '.join(map(str, value))}")
            else:
                parts.append(f"{flag} {value:g}" if isinstance(value, float) else
                             f"{flag} {value}")
        return " ".join(parts)


def _method_options(method, dim_in_decoder, limited):
    if method == "backprop":
        return dict(backprop=True)
    options = dict(loss_sup=method)
    if method in ("sim", "predsim"):
        options.update(nonlin="leakyrelu", **limited)
    if method in ("pred", "predsim") and dim_in_decoder:
        options["dim_in_decoder"] = dim_in_decoder
    return options


def _recipes():
    recipes = {}
    for dataset, model, feat_mult, shared, dim, errors, limited, cutout in ROWS:
        stem = f"{dataset}-{model}" + (f"-{feat_mult}x" if feat_mult != 1 else "")
        base = dict(dataset=dataset, model=model)
        if feat_mult != 1:
            base["feat_mult"] = float(feat_mult)
        for method, error in zip(METHODS, errors):
            options = dict(base, **shared, **_method_options(method, dim, limited))
            recipes[f"{stem}-{method}"] = Recipe(f"{stem}-{method}", method, error, options)
        if cutout is not None:
            extra, error = cutout
            options = dict(recipes[f"{stem}-predsim"].options, **extra)
            recipes[f"{stem}-cutout-predsim"] = Recipe(f"{stem}-cutout-predsim", "predsim",
                                                       error, options)
    return recipes


RECIPES = _recipes()


def list_recipes():
    return list(RECIPES)


def get_recipe(name):
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of none, {', '.join(RECIPES)}")
    return RECIPES[name]


def find_recipe(values):
    """The recipe of the run ``values`` (Config fields) describe: same dataset, model,
    width multiplier, cutout and method; None when the paper has no such row."""
    if values.get("bio") or values.get("no_detach"):
        return None
    method = run_method(values)
    for recipe in RECIPES.values():
        options = recipe.options
        if (options["dataset"] == values.get("dataset") and options["model"] == values.get("model")
                and options.get("feat_mult", 1.0) == values.get("feat_mult", 1.0)
                and options.get("cutout", False) == bool(values.get("cutout"))
                and recipe.method == method):
            return recipe
    return None


def run_method(values):
    """The method (one of METHODS) the Config fields ``values`` train with."""
    return "backprop" if values.get("backprop") else values.get("loss_sup", "predsim")


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def recipe_changes(recipe, values, explicit):
    """What of ``recipe`` the run ``values`` changed, as 'field value (recipe: value)'
    texts: the recipe's options given otherwise on the command line, its method, and
    the variants no recipe has (bio, no_detach)."""
    changes = [f"{key} {_shown(values[key])} (recipe: {_shown(recipe.options[key])})"
               for key in recipe.options if key in explicit and values.get(key) !=
               recipe.options[key]]
    if run_method(values) != recipe.method:
        changes.append(f"method {run_method(values)} (recipe: {recipe.method})")
    changes += [key for key in ("bio", "no_detach") if values.get(key)]
    return changes


def scaled_milestones(milestones, recipe_epochs, epochs):
    """The learning-rate milestones of a ``recipe_epochs`` schedule scaled to ``epochs``
    (proportionally, rounded down, at least epoch 1): 100 150 175 188 of 200 -> 20 30 35
    37 of 40."""
    return tuple(max(1, m * epochs // recipe_epochs) for m in milestones)


def apply_recipe(values, explicit, name=None):
    """``values`` (Config fields) with a recipe's options filled in; options in
    ``explicit`` (given on the command line) win. ``name``: a recipe, "none" (nothing
    applied) or None (the recipe ``find_recipe`` matches, if any).

    An explicit ``epochs`` shorter than the recipe's, without explicit milestones, scales
    the recipe's milestones to it (``scaled_milestones``). When explicit options change
    the recipe (``recipe_changes``) the note names them and ``values["recipe"]`` records
    "NAME with changes: field, ...": its published number is not this run's.

    Returns (values, one-line note saying which recipe was used, or None).
    """
    values = dict(values)
    if name == "none":
        return values, None
    recipe = get_recipe(name) if name is not None else find_recipe(values)
    if recipe is None:
        return values, None
    values.update({key: value for key, value in recipe.options.items() if key not in explicit})
    scaled = ""
    if ("epochs" in explicit and "lr_decay_milestones" not in explicit
            and values["epochs"] < recipe.options["epochs"]):
        values["lr_decay_milestones"] = scaled_milestones(
            recipe.options["lr_decay_milestones"], recipe.options["epochs"], values["epochs"])
        scaled = (f"; its lr milestones scaled to {values['epochs']} epochs: "
                  f"{_shown(values['lr_decay_milestones'])}")
    how = "" if name is not None else (f" for --dataset {values['dataset']} --model "
                                       f"{values['model']}")
    tail = ", --recipe none for the script's defaults" if name is None else ""
    changes = recipe_changes(recipe, values, explicit)
    if changes:
        values["recipe"] = (f"{recipe.name} with changes: "
                            + ", ".join(change.split(" ")[0] for change in changes))
        note = (f"recipe {recipe.name}{how} with your changes: {', '.join(changes)} (its "
                f"published test error {recipe.published_error:.2f}% is for the recipe "
                f"unchanged){scaled}{tail}")
    else:
        values["recipe"] = recipe.name
        note = (f"using the paper's recipe {recipe.name}{how} (published test error "
                f"{recipe.published_error:.2f}%){scaled}{tail}")
    return values, note


def format_recipes():
    """The recipe table that ``keras-local-train --list-recipes`` prints."""
    width = max(map(len, RECIPES))
    lines = [f"{'recipe':<{width}}  error %  options (Config defaults otherwise)"]
    for recipe in RECIPES.values():
        lines.append(f"{recipe.name:<{width}}  {recipe.published_error:7.2f}  {recipe.flags()}")
    return "\n".join(lines)
