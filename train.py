#!/usr/bin/env python
"""Train a network with local error signals: ``keras_local.cli.train`` (installed as the
console script ``keras-local-train``).

Example:  python train.py --dataset cifar10 --model vgg11b
"""

import sys

from keras_local.cli.train import main, make_parser, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
