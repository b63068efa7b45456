"""A few training steps of the authors' train.py from given weights on given batches
(run with the reference folder as the working directory and its venv's python;
benchmarks/exactness.py does this).

    python reference_steps.py IN.npz OUT.npz {float32,float64} [train.py arguments ...]

IN.npz holds ``x`` (N, C, H, W), ``y`` (N,), ``batch_size``, ``lr`` and the starting
weights under their PyTorch state_dict names (prefix ``w:``). Executes train.py's
module-level code up to its training loop (arguments, datasets, model, optimisers; in
float64 under ``torch.set_default_dtype(torch.float64)``), loads the weights, then calls
its own, unmodified ``train(1, lr)`` on the batches in order, and writes the state_dict
after the steps to OUT.npz.
"""

import os
import sys

import numpy as np

from common import load_reference_setup  # this script's folder, before the reference's

sys.path.insert(0, os.getcwd())  # the folder's torchvision stand-in, as for train.py itself
source_path, target_path, dtype_name = sys.argv[1:4]
sys.argv = ["train.py"] + sys.argv[4:]

import torch  # noqa: E402

if dtype_name not in ("float32", "float64"):
    raise SystemExit(f"dtype {dtype_name!r}: choose float32 or float64")
dtype = getattr(torch, dtype_name)
torch.set_default_dtype(dtype)
namespace = load_reference_setup()
model, optimizer = namespace["model"], namespace["optimizer"]

given = np.load(source_path)
state = {name[2:]: torch.from_numpy(given[name]).to(dtype) for name in given.files
         if name.startswith("w:")}
missing, unexpected = model.load_state_dict(state, strict=False)
if unexpected or any(not name.endswith("num_batches_tracked") for name in missing):
    raise SystemExit(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")


class Batches(list):
    """What train() reads of its loader: iteration and ``len(loader.dataset)``."""

    def __init__(self, batches, examples):
        super().__init__(batches)
        self.dataset = range(examples)


x, y, size = given["x"], given["y"], int(given["batch_size"])
batches = [(torch.from_numpy(x[i:i + size]).to(dtype), torch.from_numpy(y[i:i + size]).long())
           for i in range(0, len(x), size)]
namespace["train_loader"] = Batches(batches, len(x))
lr = float(given["lr"])
for group in optimizer.param_groups:
    group["lr"] = lr
model.set_learning_rate(lr)
namespace["train"](1, lr)
np.savez(target_path, **{name: value.detach().cpu().double().numpy()
                         for name, value in model.state_dict().items()})
print("STEPS_DONE")
