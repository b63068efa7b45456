"""``python -m export.predict MODEL.onnx INPUT...``: ``keras_local.cli.predict`` (console
script ``keras-local-predict``)."""

import sys

from keras_local.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
