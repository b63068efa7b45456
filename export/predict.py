"""``python -m export.predict MODEL.onnx INPUT...``: the repository shim of
``keras-local-predict`` (``keras_local.cli.predict``)."""

import sys

from keras_local.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
