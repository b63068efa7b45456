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


# Bounds of the JSON files a user may hand us (a run's config.json, an export's
# metadata.json): a config is a few KB, and nothing of ours nests deeper than a few levels.
MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32


class JSONFileError(ValueError):
    """A JSON file that is unreadable, too large or nested too deeply (one-line message)."""


def read_json_file(path, max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH):
    """The JSON value in ``path``, refused in one line when the file is larger than
    ``max_bytes`` or nested deeper than ``max_depth``."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(max_bytes + 1)
    except OSError as error:
        raise JSONFileError(f"{path}: not readable ({error.strerror or error})") from None
    return parse_json_bytes(data, str(path), max_bytes, max_depth)


def parse_json_bytes(data, source, max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH):
    """``json.loads`` of ``data`` (bytes) with the bounds of ``read_json_file``."""
    if len(data) > max_bytes:
        raise JSONFileError(f"{source}: larger than the limit of {max_bytes:,} bytes")
    try:
        value = json.loads(data)
    except RecursionError:  # the parser gives up far below the interpreter's stack limit
        raise JSONFileError(f"{source}: nested deeper than the limit of {max_depth} "
                            f"levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise JSONFileError(f"{source}: not valid JSON ({error})") from None
    if json_depth(value) > max_depth:
        raise JSONFileError(f"{source}: nested deeper than the limit of {max_depth} levels")
    return value


def json_depth(value):
    """Nesting depth of a parsed JSON value (a scalar: 0, ``[1]``: 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest
