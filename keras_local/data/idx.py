"""Reader for the IDX format of the MNIST family (optionally gzip-compressed)."""

import gzip
import os

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataFileError(ValueError):
    """A data file that is missing, truncated or not in the expected format."""


def read_idx(path, limit=None):
    """Read an IDX file (``.gz`` or raw) into a NumPy array.

    ``limit`` reads only the first ``limit`` items (the header still has to be valid).
    Raises DataFileError naming the file when the header or the payload is wrong.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in _DTYPES:
                raise DataFileError(f"{path}: not an IDX file (bad magic number)")
            dtype = np.dtype(_DTYPES[header[2]])
            ndim = header[3]
            dims_bytes = stream.read(4 * ndim)
            if len(dims_bytes) != 4 * ndim:
                raise DataFileError(f"{path}: truncated IDX header")
            dims = [int(d) for d in np.frombuffer(dims_bytes, dtype=">u4")]
            if limit is not None:
                dims[0] = min(dims[0], limit)
            count = int(np.prod(dims))
            payload = stream.read(count * dtype.itemsize)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataFileError(f"{path}: cannot read ({error})") from None
    if len(payload) != count * dtype.itemsize:
        raise DataFileError(
            f"{path}: truncated: expected {count * dtype.itemsize} bytes of data, "
            f"found {len(payload)}")
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path, array):
    """Write a uint8 array as a gzip IDX file, atomically (temporary name, then rename)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    temporary = f"{path}.tmp"
    with gzip.GzipFile(temporary, "wb", mtime=0) as stream:
        stream.write(header + array.tobytes())
    os.replace(temporary, path)
