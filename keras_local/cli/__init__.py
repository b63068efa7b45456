"""The command lines, installed as console scripts (``pyproject.toml``): ``keras-local-train``,
``keras-local-export``, ``keras-local-predict`` and ``keras-local-report``. The repository's
``train.py`` and ``export/`` are thin shims over these modules. Only the standard library is
imported here, so that ``predict`` needs only onnxruntime, NumPy and Pillow."""

import argparse

# The names every usage line, error prefix and printed "next" command uses: they work
# wherever the package is installed, which `python -m export` (a folder of the
# checkout) does not.
TRAIN_COMMAND = "keras-local-train"
EXPORT_COMMAND = "keras-local-export"
PREDICT_COMMAND = "keras-local-predict"
REPORT_COMMAND = "keras-local-report"

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")
