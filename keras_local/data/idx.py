"""Reader for the IDX format of the MNIST family (optionally gzip-compressed)."""

import gzip
import math
import os

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataFileError(ValueError):
    """A data file that is missing, truncated or not in the expected format."""


# Header-declared sizes are untrusted: a 4 MiB gzip may claim 5 million images. The
# largest MNIST-family file (EMNIST by_class, 814k images) has 640 MB of pixels.
MAX_IDX_BYTES = 1 << 31
# deflate compresses at most 1032:1, so a gzip file of n bytes holds at most 1032 n.
MAX_DEFLATE_RATIO = 1032


def read_idx(path, limit=None, dtype=None, max_bytes=MAX_IDX_BYTES):
    """Read an IDX file (``.gz`` or raw) into a NumPy array.

    ``limit`` reads only the first ``limit`` items (the header still has to be valid);
    ``dtype`` (e.g. np.uint8) refuses files of any other element type. The declared
    payload is checked against the file's real size (raw: equal; gzip: at most the
    deflate ratio) and ``max_bytes`` before anything is allocated, and no more than the
    declared bytes are ever decompressed. Raises DataFileError naming the file.
    """
    compressed = str(path).endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        file_size = os.path.getsize(path)
        with opener(path, "rb") as stream:
            header = stream.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in _DTYPES:
                raise DataFileError(f"{path}: not an IDX file (bad magic number)")
            file_dtype = np.dtype(_DTYPES[header[2]])
            if dtype is not None and file_dtype != np.dtype(dtype):
                raise DataFileError(f"{path}: IDX elements are {file_dtype.name}, expected "
                                    f"{np.dtype(dtype).name}")
            ndim = header[3]
            dims_bytes = stream.read(4 * ndim)
            if len(dims_bytes) != 4 * ndim:
                raise DataFileError(f"{path}: truncated IDX header")
            dims = [int(d) for d in np.frombuffer(dims_bytes, dtype=">u4")]
            declared = math.prod(dims) * file_dtype.itemsize  # Python ints: no overflow
            _check_declared_size(path, declared, 4 + 4 * ndim, file_size, compressed, max_bytes)
            if limit is not None and dims:
                dims[0] = min(dims[0], limit)
            size = math.prod(dims) * file_dtype.itemsize
            payload = stream.read(size)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataFileError(f"{path}: cannot read ({error})") from None
    if len(payload) != size:
        raise DataFileError(
            f"{path}: truncated: expected {size} bytes of data, found {len(payload)}")
    return np.frombuffer(payload, dtype=file_dtype).reshape(dims).astype(
        file_dtype.newbyteorder("="))


def _check_declared_size(path, declared, header_size, file_size, compressed, max_bytes):
    if compressed:
        possible = file_size * MAX_DEFLATE_RATIO
        if declared > possible:
            raise DataFileError(f"{path}: header declares {declared:,} bytes of data, more "
                                f"than a {file_size:,}-byte gzip file can hold")
    elif header_size + declared != file_size:
        raise DataFileError(f"{path}: header declares {declared:,} bytes of data but the "
                            f"file has {file_size - header_size:,}")
    if declared > max_bytes:
        raise DataFileError(f"{path}: header declares {declared:,} bytes of data, above the "
                            f"limit of {max_bytes:,}")


def write_idx(path, array):
    """Write a uint8 array as a gzip IDX file, atomically (temporary name, then rename)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    temporary = f"{path}.tmp"
    with gzip.GzipFile(temporary, "wb", mtime=0) as stream:
        stream.write(header + array.tobytes())
    os.replace(temporary, path)
