"""One MultiWorkerMirroredStrategy worker, for tests/test_distribute.py.

Run with TF_CONFIG set (the test starts two of these on 127.0.0.1):

    python tests/multiworker_worker.py --data DATA.npz --out DIR [--epochs 3]
        [--backup-dir DIR] [--pause-after-epoch N]

Trains a small MLP with ``model.fit`` (no train.py), with ``BackupAndRestore`` when
``--backup-dir`` is given (each worker keeps its own copy, ``per_worker_path``: Keras 3
writes the backup from every worker), appends each finished epoch to ``DIR/epochs_<task>.txt``, and at the
end saves the weights to ``DIR/weights_<task>.npz`` and ``is_chief`` to ``DIR/chief_<task>.txt``. ``--pause-after-epoch N``: after
epoch N (1-based) is backed up, sleep, so that the test can kill this worker.
"""

import argparse
import json
import os
import time

from helpers import to_numpy

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backup-dir", default=None)
    parser.add_argument("--pause-after-epoch", type=int, default=0)
    args = parser.parse_args()
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]

    import keras_local as kl
    from keras_local.run.distribute import is_chief, make_strategy, per_worker_path

    config = kl.Config(strategy="multiworker", num_layers=2, num_hidden=32, optim="adam",
                       lr=1e-3, jit_compile=False)
    strategy = make_strategy(config)  # first: before any other TensorFlow op

    import keras
    import numpy as np

    data = np.load(args.data)
    with strategy.scope():
        model = kl.build_model("mlp", data["x"].shape[1:], 10, config)
        model.compile()

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            with open(os.path.join(args.out, f"epochs_{task}.txt"), "a") as f:
                f.write(f"{epoch + 1}\n")
            if epoch + 1 == args.pause_after_epoch:
                time.sleep(600)  # the test kills this worker here

    callbacks = []
    if args.backup_dir:
        callbacks.append(keras.callbacks.BackupAndRestore(
            per_worker_path(args.backup_dir, strategy), delete_checkpoint=False))
    callbacks.append(EpochLog())  # after the backup: pausing means the epoch is saved
    model.fit(data["x"], data["y"], batch_size=args.batch_size, epochs=args.epochs,
              shuffle=False, verbose=0, callbacks=callbacks)
    np.savez(os.path.join(args.out, f"weights_{task}.npz"),
             **{v.path: to_numpy(v) for v in model.weights})
    with open(os.path.join(args.out, f"chief_{task}.txt"), "w") as f:
        f.write(str(is_chief(strategy)))
    print(f"worker {task} done", flush=True)


if __name__ == "__main__":
    main()
