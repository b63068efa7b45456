"""Times one full epoch of the authors' train.py (run with the reference folder as the
working directory and its venv's python; benchmarks/epoch.py does this).

    python reference_epoch.py [train.py arguments ...]

Executes train.py's module-level code up to its training loop (arguments, datasets,
model, optimisers), then calls its own, unmodified ``train(1, lr)`` over the whole
training loader and ``test(1)`` over the test loader, and prints
``EPOCH_JSON {"train_s": ..., "test_s": ...}``.
"""

import json
import os
import sys
import time

from common import load_reference_setup  # this script's folder, before the reference's

sys.path.insert(0, os.getcwd())  # the folder's torchvision stand-in, as for train.py itself
sys.argv = ["train.py"] + sys.argv[1:]
namespace = load_reference_setup()
started = time.perf_counter()
namespace["train"](1, namespace["args"].lr)
trained = time.perf_counter()
namespace["test"](1)
tested = time.perf_counter()
print("EPOCH_JSON " + json.dumps({"train_s": trained - started, "test_s": tested - trained}))
