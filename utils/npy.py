"""The header of a .npy file of fixed-width rows, read from its first bytes without loading the array.

One check for every reader of such files: the downloader (on the bytes a server sends) and the loader.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

MAX_HEADER = 1 << 16  # a .npy header longer than this is not one numpy writes for a 2-d array


class NpyHeaderError(ValueError):
    """Bytes that are not the .npy file they should be; the message names the file."""


@dataclass(frozen=True)
class NpyHeader:
    size: int  # bytes before row 0
    rows: int
    fortran_order: bool


def read_header(head: bytes, what, row_bytes: int) -> NpyHeader | None:
    """The header of a (rows, row_bytes) uint8 .npy from its first bytes; None while `head` ends inside it.

    NpyHeaderError naming `what` if the bytes are not such a file (another dtype or shape, a damaged
    header, or something else altogether, such as an HTML page)."""
    fmt = np.lib.format
    if len(head) < fmt.MAGIC_LEN:
        return None
    if not head.startswith(fmt.MAGIC_PREFIX):
        kind = "an HTML page" if head.lstrip()[:1] == b"<" else "not a .npy file"
        raise NpyHeaderError(f"{what} is {kind} (it starts with {head[:16]!r})")
    width = 2 if head[6] == 1 else 4  # the header length field: 2 bytes in format 1.0, 4 after
    if len(head) < fmt.MAGIC_LEN + width:
        return None
    size = fmt.MAGIC_LEN + width + int.from_bytes(head[fmt.MAGIC_LEN:fmt.MAGIC_LEN + width], "little")
    if size > MAX_HEADER:
        raise NpyHeaderError(f"{what} declares a {size}-byte .npy header")
    if len(head) < size:
        return None
    f = io.BytesIO(head[:size])
    try:
        major, _ = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f, max_header_size=MAX_HEADER)
    except ValueError as e:
        raise NpyHeaderError(f"{what} has a corrupt .npy header: {e}") from None
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != row_bytes:
        raise NpyHeaderError(f"{what} holds {dtype} {shape}; expected uint8 (rows, {row_bytes})")
    return NpyHeader(size, shape[0], fortran)


def read_file_header(path, row_bytes: int) -> NpyHeader:
    """read_header of a file on disk; one that ends inside its header is an NpyHeaderError too."""
    with open(path, "rb") as f:
        found = read_header(f.read(MAX_HEADER), path, row_bytes)
    if found is None:
        raise NpyHeaderError(f"{path} ends inside its .npy header")
    return found
