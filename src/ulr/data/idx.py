"""Reader for the IDX format used by MNIST and Fashion-MNIST (plain or gzip-compressed)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx_bytes(path: str | Path) -> bytes:
    """Return the decompressed bytes of an IDX file.

    Compression is detected from the content (gzip magic ``1f 8b``), not the file name, so a
    gunzipped file that kept its ``.gz`` name still reads.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If a gzip file is truncated or corrupt; the message names the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse the raw bytes of an IDX file.

    Args:
        data: Uncompressed IDX content: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian
            ``uint32`` dimensions, then the array in C order.
        source: Name used in error messages (usually the file path).

    Returns:
        A writable numpy array with the stored shape and the native-endian version of the stored
        dtype (``uint8`` for MNIST-style images and labels).

    Raises:
        ValueError: On a bad magic number, unknown type code, or a payload whose size does not
            match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source}: not an IDX file (bad magic number {data[:4].hex() or '-'})")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{source}: unknown IDX data type 0x{type_code:02x}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes, ndim={ndim})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        raise ValueError(
            f"{source}: IDX payload is {actual} bytes but header shape {shape} needs {expected}"
            " (truncated or corrupt file)"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or uncompressed) into a numpy array.

    Args:
        path: File path, gzip-compressed or not.

    Returns:
        Array with the shape stored in the header, e.g. ``uint8 [60000, 28, 28]`` for the
        Fashion-MNIST training images or ``uint8 [60000]`` for its labels.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is corrupt or truncated; the message names the file.
    """
    return parse_idx(read_idx_bytes(path), source=str(path))
