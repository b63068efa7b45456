"""``python -m export RUN_DIR``: ``keras_local.cli.export`` (console script
``keras-local-export``)."""

import sys

from keras_local.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
