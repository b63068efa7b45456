"""Exceptions that mean "bad input" to the command-line tools (one line, exit code 2)."""

from keras_local.data import DatasetUnavailableError
from keras_local.data.idx import DataFileError

USER_ERRORS = (ValueError, DataFileError, DatasetUnavailableError, FileNotFoundError)
