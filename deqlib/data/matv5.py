"""A small reader for MATLAB v5 MAT-files, enough for the ILSVRC-2012 devkit's ``meta.mat``.

``meta.mat`` holds one struct array, ``synsets``, whose fields ``ILSVRC2012_ID`` (a double) and
``WNID`` (a char array) map the validation ground truth's class ids to WordNet ids. Reading it
needs numeric and char arrays, structs, cells and zlib-compressed elements (MATLAB 7 writes
every variable compressed and stores whole doubles in the smallest integer type that holds
them); scipy is not a dependency of this project for one file.

Not supported (a ValueError names what was found): v4 and v7.3 (HDF5) files, sparse, complex,
object and function-handle arrays.

Format: "MAT-File Format", MathWorks, 2024 (the v5 level: a 128-byte header, then data
elements of an 8-byte tag ``(type, nbytes)`` -- or a 4-byte "small" tag for up to 4 bytes of
data -- padded to 8 bytes; ``miCOMPRESSED`` elements hold one zlib-compressed element).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_mat"]

# Data types of the element tags (the "mi" constants).
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED, _MI_UTF8, _MI_UTF16, _MI_UTF32 = 14, 15, 16, 17, 18
# Array classes (the "mx" constants) -> the dtype a numeric array of that class has in MATLAB.
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MX_NAMES = {3: "object", 5: "sparse", 16: "function handle", 17: "opaque"}


class _Reader:
    """Data elements of one byte string, in the file's byte order."""

    def __init__(self, data: bytes, order: str, where: str):
        self.data, self.order, self.where, self.pos = data, order, where, 0

    def fail(self, what: str) -> None:
        raise ValueError(f"{self.where}: {what} at byte {self.pos}")

    def element(self) -> tuple[int, bytes]:
        """The next element as ``(type, payload)``, the position moved past its padding."""
        if self.pos + 8 > len(self.data):
            self.fail("truncated element tag")
        first, second = struct.unpack_from(self.order + "II", self.data, self.pos)
        if first >> 16:  # small element: type in the low half, byte count in the high half
            mtype, n = first & 0xFFFF, first >> 16
            if n > 4:
                self.fail(f"small element of {n} bytes")
            payload = self.data[self.pos + 4:self.pos + 4 + n]
            self.pos += 8
            return mtype, payload
        mtype, n = first, second
        start = self.pos + 8
        if start + n > len(self.data):
            self.fail(f"element of {n} bytes past the end ({len(self.data)} bytes)")
        # A compressed element is not padded; every other one is, to a multiple of 8 bytes.
        self.pos = start + n if mtype == _MI_COMPRESSED else start + n + (-n % 8)
        return mtype, self.data[start:start + n]

    def numbers(self, mtype: int, payload: bytes) -> np.ndarray:
        dtype = _MI_DTYPES.get(mtype)
        if dtype is None:
            self.fail(f"data type {mtype} where numbers were expected")
        dt = np.dtype(dtype).newbyteorder(self.order)
        if len(payload) % dt.itemsize:
            self.fail(f"{len(payload)} bytes of {dtype}")
        return np.frombuffer(payload, dt).astype(np.dtype(dtype).newbyteorder("="))


def _text(reader: _Reader, mtype: int, payload: bytes) -> str:
    codec = {_MI_UTF8: "utf-8", _MI_UTF16: "utf-16-le" if reader.order == "<" else "utf-16-be",
             _MI_UTF32: "utf-32-le" if reader.order == "<" else "utf-32-be"}.get(mtype)
    if codec is not None:
        return payload.decode(codec)
    return "".join(map(chr, reader.numbers(mtype, payload).tolist()))  # miUINT16 / miUINT8 codes


def _matrix(reader: _Reader, payload: bytes) -> tuple[str, Any]:
    """One ``miMATRIX`` element -> ``(name, value)``: a numeric array becomes a NumPy array of its
    dimensions (column-major, as MATLAB stores it), a char array a string (a list of strings for
    several rows), a struct array a list of dicts (one per element), a cell array a list."""
    if not payload:  # an empty matrix may be written as a bare tag
        return "", np.zeros((0, 0))
    sub = _Reader(payload, reader.order, reader.where)
    mtype, flags = sub.element()
    if mtype != 6 or len(flags) != 8:
        sub.fail("an array without its flags")
    word = struct.unpack_from(reader.order + "I", flags)[0]
    mx, is_complex = word & 0xFF, bool(word & 0x800)
    dims = tuple(int(d) for d in sub.numbers(*sub.element()))
    name = sub.element()[1].decode("ascii", "replace")
    count = int(np.prod(dims)) if dims else 0
    if mx in _MX_NAMES or is_complex:
        what = "complex" if is_complex else _MX_NAMES[mx]
        sub.fail(f"variable {name!r} is a {what} array, which this reader does not support")
    if mx in _MX_NUMERIC:
        values = sub.numbers(*sub.element()).astype(_MX_NUMERIC[mx])
        if values.size != count:
            sub.fail(f"variable {name!r} has {values.size} values for dimensions {dims}")
        return name, values.reshape(dims, order="F")
    if mx == _MX_CHAR:
        chars = _text(sub, *sub.element()) if count else ""
        if len(chars) != count:
            sub.fail(f"char array {name!r} has {len(chars)} characters for dimensions {dims}")
        rows = dims[0] if len(dims) == 2 else 1
        if rows <= 1:
            return name, chars
        return name, ["".join(chars[c * rows + r] for c in range(count // rows)) for r in range(rows)]
    if mx == _MX_CELL:
        return name, [_matrix(sub, _expect_matrix(sub))[1] for _ in range(count)]
    if mx == _MX_STRUCT:
        width = int(sub.numbers(*sub.element())[0])
        raw = sub.element()[1]
        fields = [raw[i:i + width].split(b"\0", 1)[0].decode("ascii")
                  for i in range(0, len(raw), width)] if width else []
        return name, [{f: _matrix(sub, _expect_matrix(sub))[1] for f in fields} for _ in range(count)]
    sub.fail(f"variable {name!r} has an unknown array class {mx}")
    raise AssertionError  # fail raised


def _expect_matrix(reader: _Reader) -> bytes:
    mtype, payload = reader.element()
    if mtype != _MI_MATRIX:
        reader.fail(f"data type {mtype} where an array was expected")
    return payload


def read_mat(path: str | os.PathLike | bytes, where: str | None = None) -> dict[str, Any]:
    """The variables of a MATLAB v5 MAT-file, by name.

    Args:
        path: the file, or its bytes. where: how errors name it (default: the path).
    Returns:
        ``{name: value}``; values as described in :func:`_matrix` (e.g. ``meta.mat``'s
        ``synsets`` is a list of 1860 dicts with ``"ILSVRC2012_ID"`` a ``(1, 1)`` float array and
        ``"WNID"`` a string).
    Raises:
        ValueError: not a v5 MAT-file, or a construct this reader does not support, naming it.
    """
    if isinstance(path, bytes):
        data, where = path, where or "MAT-file"
    else:
        data, where = Path(path).read_bytes(), where or str(path)
    if len(data) < 128 or not data.startswith(b"MATLAB 5.0 MAT-file"):
        head = data[:20].decode("ascii", "replace")
        raise ValueError(f"{where} is not a MATLAB v5 MAT-file (it starts {head!r}; v4 and v7.3 "
                         "files are not read)")
    indicator = data[126:128]
    if indicator not in (b"IM", b"MI"):
        raise ValueError(f"{where}: bad byte-order mark {indicator!r} in the MAT-file header")
    order = "<" if indicator == b"IM" else ">"
    reader = _Reader(data, order, where)
    reader.pos = 128
    out: dict[str, Any] = {}
    while reader.pos < len(data):
        mtype, payload = reader.element()
        if mtype == _MI_COMPRESSED:
            try:
                inner = zlib.decompress(payload)
            except zlib.error as err:
                raise ValueError(f"{where}: a compressed element does not inflate ({err})") from err
            inner_reader = _Reader(inner, order, where)
            mtype, payload = inner_reader.element()
        if mtype != _MI_MATRIX:
            continue  # top-level elements other than arrays carry no variable
        name, value = _matrix(reader, payload)
        out[name] = value
    return out
