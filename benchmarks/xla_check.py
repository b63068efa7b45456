"""``throughput.py --check-xla``: the same training steps without XLA and with each XLA
choice, from the same weights; the largest differences."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MODELS, build, cached_batches  # noqa: E402


def check_xla(name, mode, args, steps=3):
    """Largest differences between no XLA and each XLA choice after ``steps`` steps
    from the same weights on the same batch (dropout off: XLA draws other random
    masks): of the metrics, of the trainable weights, next to the largest change of a
    trainable weight in those steps. SGD with momentum (lr 0.01, 0.9), whose update is
    linear in the gradient: Adam's first steps are about +-lr for any gradient well
    above its epsilon, so on weights whose gradient is zero up to rounding (a bias
    before BatchNorm) it turns float rounding into +-lr differences. That the step runs
    at all shows that every op in the compiled part has an XLA kernel: a
    jit_compile=True function fails otherwise."""
    import numpy as np

    choices = ["none"] + [xla for xla in args.xla if xla != "none"] or ["update"]
    if choices == ["none"]:
        choices.append("update")
    models = {xla: build(name, mode, xla, args, dropout=0.0, optim="sgd", lr=0.01, momentum=0.9)
              for xla in choices}
    _, input_shape, _ = MODELS[name]
    initial = [np.asarray(w) for w in models["none"].trainable_variables]
    logs, weights = {}, {}
    for xla, model in models.items():
        iterator = iter(cached_batches(input_shape, args.batch_size))
        model.make_train_function()
        for _ in range(steps):
            out = model.train_function(iterator)
        out = out.get_value() if hasattr(out, "get_value") else out
        logs[xla] = {key: float(value) for key, value in out.items()}
        weights[xla] = [np.asarray(w) for w in model.trainable_variables]
    update = max(float(np.max(np.abs(a - b))) if a.size else 0.0
                 for a, b in zip(weights["none"], initial))
    checks = []
    for xla in choices[1:]:
        weight_diff = max(float(np.max(np.abs(a - b))) if a.size else 0.0
                          for a, b in zip(weights["none"], weights[xla]))
        checks.append({"model": name, "mode": mode, "xla": xla, "steps": steps,
                       "max_weight_diff": weight_diff, "max_update": update,
                       "max_metric_diff": max(abs(logs["none"][k] - logs[xla][k])
                                              for k in logs["none"]),
                       "loss_plain": logs["none"]["loss"], "loss_xla": logs[xla]["loss"]})
    return checks


def print_checks(checks):
    print(f"\n{'no XLA vs XLA, 3 steps':<28}{'xla':<8}{'loss (none)':>12}{'loss (xla)':>12}"
          f"{'max |dmetric|':>15}{'max |dweight|':>15}{'max |update|':>14}")
    for c in checks:
        print(f"{c['model'] + ' ' + c['mode']:<28}{c['xla']:<8}{c['loss_plain']:>12.6f}"
              f"{c['loss_xla']:>12.6f}{c['max_metric_diff']:>15.2e}"
              f"{c['max_weight_diff']:>15.2e}{c['max_update']:>14.2e}")
