#!/usr/bin/env python
"""The repository shim of the console script ``keras-local-train``
(``keras_local.cli.train``): ``python train.py ARGS`` runs ``keras-local-train ARGS``.
"""

import sys

from keras_local.cli.train import main, make_parser, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
