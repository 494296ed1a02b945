"""Reader and writer for the IDX format (MNIST / Fashion-MNIST files), optionally gzip-compressed.

Layout: a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 sizes,
then the values in C order, big-endian. Gzip is detected from the content (``1f 8b``), not the name.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from mimkit.errors import MimkitError

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == _GZIP_MAGIC else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # truncated / corrupt gzip stream
        raise MimkitError(f"cannot read IDX file {path}: {e}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (plain or gzip) into an array of its stored shape.

    Returns: an array of shape ``(d0, d1, ...)`` as stored (e.g. ``(N, 28, 28)`` uint8 images or
    ``(N,)`` uint8 labels), in native byte order.
    Raises MimkitError for a bad magic number, an unknown type code or a size mismatch.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise MimkitError(
            f"{path} is not an IDX file (bad magic {raw[:4].hex() or 'empty'}; expected 0000<type><ndim>)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        accepted = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise MimkitError(f"{path}: unknown IDX type code 0x{code:02x} (accepted: {accepted})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MimkitError(f"{path}: IDX header truncated ({len(raw)} bytes, expected at least {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise MimkitError(f"{path}: IDX size {len(raw)} bytes does not match header shape {shape} ({expected} bytes)")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip when ``compress`` or, if None, when the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    code = next(
        (c for c, d in _IDX_DTYPES.items() if array.dtype.kind == d.kind and array.dtype.itemsize == d.itemsize), None
    )
    if code is None:
        raise MimkitError(
            f"cannot write dtype {array.dtype} as IDX (accepted: uint8, int8, int16, int32, float32, float64)"
        )
    if array.ndim > 255:
        raise MimkitError(f"cannot write a {array.ndim}-d array as IDX (at most 255 dimensions)")
    payload = (
        bytes([0, 0, code, array.ndim])
        + np.asarray(array.shape, dtype=">u4").tobytes()
        + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    )
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
