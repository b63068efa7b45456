"""JSON result files written whole or not at all."""

import contextlib
import json
import os


class WriteError(OSError):
    """A file could not be written (disk full, read-only or missing place); the previous
    version of the file is untouched and no temporary file is left. One line for the user."""

    def __str__(self):
        return self.strerror or super().__str__()


def write_atomically(path, write):
    """Call ``write(temporary)`` to write the new content of ``path`` at a temporary name
    beside it (``.partial`` before the extension: Keras wants ``.keras``), flush it to
    disk, then rename it over ``path``: a reader finds the previous content or the new
    one, never a mixture. On any failure the temporary file is removed and an OSError
    becomes WriteError naming ``path``."""
    root, extension = os.path.splitext(path)
    temporary = f"{root}.partial{extension}"
    try:
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise WriteError(error.errno, f"cannot write {path}: "
                                          f"{error.strerror or error}") from None
        raise


def write_json_atomically(path, payload):
    """Write ``payload`` to ``path`` whole or not at all (``write_atomically``)."""
    def write(temporary):
        with open(temporary, "w") as stream:
            json.dump(payload, stream, indent=2, sort_keys=True)

    write_atomically(path, write)
