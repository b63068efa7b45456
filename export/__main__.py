"""``python -m export RUN_DIR``: the repository shim of ``keras-local-export``
(``keras_local.cli.export``)."""

import sys

from keras_local.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
