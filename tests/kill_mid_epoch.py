"""Runs train.py's main() and SIGKILLs the process itself at a given (epoch, batch):
``python tests/kill_mid_epoch.py EPOCH BATCH TRAIN_ARGS...`` (EPOCH 1-based). A real
SIGKILL, placed deterministically, so the resume test does not depend on timing."""

import os
import signal
import sys

from helpers import ROOT, train_main

sys.path.insert(0, ROOT)  # this checkout's keras_local


def main():
    kill_epoch, kill_batch = int(sys.argv[1]) - 1, int(sys.argv[2]) - 1
    from keras_local.run.callbacks import NaNGuard

    original = NaNGuard.on_train_batch_begin

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == kill_epoch and batch == kill_batch:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, batch, logs)

    NaNGuard.on_train_batch_begin = on_train_batch_begin
    return train_main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
