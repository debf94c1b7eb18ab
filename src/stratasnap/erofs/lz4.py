"""liblz4 through ctypes: fixed-output ("destSize") compression, fast and HC.

EROFS compressed files are cut into fixed-size *outputs*: each 4 KiB block is
filled with as much input as fits once compressed. liblz4 has that primitive
(``LZ4_compress_destSize``; ``LZ4_compress_HC_destSize`` for the slower,
tighter HC matcher). liblz4.so.1 is on every Debian (apt itself links it).
ctypes releases the GIL during each call, so a worker thread compresses while
the main thread parses the tar.

liblz4 1.9.3 or later is required: earlier releases had destSize bugs
(1.9.2 fixed a corruption, 1.9.3 HC destSize reading past its input). Each
compressed block is also decoded once before it is used (a few percent of the
time), so a library bug can cost space, never content.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

__all__ = ["HC_DEFAULT_LEVEL", "Lz4", "Lz4Unavailable", "library_error"]

MIN_VERSION = 10903  # 1.9.3, as LZ4_versionNumber() spells it
HC_DEFAULT_LEVEL = 9  # liblz4's (and mkfs.erofs's) default HC level
_INT_P = ctypes.POINTER(ctypes.c_int)


class Lz4Unavailable(RuntimeError):
    """liblz4 cannot be loaded, or is too old."""


@dataclass(frozen=True)
class _Lib:
    dll: ctypes.CDLL
    version: int


@functools.cache
def _load() -> _Lib | str:
    """The library, or why it cannot be used (computed once)."""
    try:
        dll = ctypes.CDLL("liblz4.so.1")
    except OSError as exc:
        return f"liblz4 is not installed (Debian: apt-get install liblz4-1): {exc}"
    dll.LZ4_versionNumber.restype = ctypes.c_int
    version = dll.LZ4_versionNumber()
    if version < MIN_VERSION:
        return f"liblz4 {version} is older than 1.9.3 (its fixed-output compression had bugs)"
    dll.LZ4_compress_destSize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, _INT_P, ctypes.c_int]
    dll.LZ4_compress_destSize.restype = ctypes.c_int
    dll.LZ4_compress_HC_destSize.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        _INT_P,
        ctypes.c_int,
        ctypes.c_int,
    ]
    dll.LZ4_compress_HC_destSize.restype = ctypes.c_int
    dll.LZ4_sizeofStateHC.restype = ctypes.c_int
    dll.LZ4_decompress_safe.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    dll.LZ4_decompress_safe.restype = ctypes.c_int
    return _Lib(dll, version)


_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int


def library_error() -> str | None:
    """Why lz4 compression is unavailable here, or None when it works."""
    lib = _load()
    return lib if isinstance(lib, str) else None


class Lz4:
    """One compressor (not thread-safe: one per thread). ``hc_level`` None: fast lz4."""

    def __init__(self, hc_level: int | None = None) -> None:
        lib = _load()
        if isinstance(lib, str):
            raise Lz4Unavailable(lib)
        self._dll = lib.dll
        self._hc_level = hc_level
        self._state = (
            ctypes.create_string_buffer(self._dll.LZ4_sizeofStateHC()) if hc_level else None
        )
        self._consumed = ctypes.c_int()
        self._consumed_ref = ctypes.byref(self._consumed)
        self._check = ctypes.create_string_buffer(0)  # decoded copy, grown on demand
        self._check_addr = ctypes.addressof(self._check)

    def compress(self, src: int, src_len: int, dst: int, dst_len: int) -> tuple[int, int]:
        """Compress from address ``src`` as much as fits in ``dst_len`` bytes at ``dst``.

        Returns (input bytes consumed, output bytes written) when that input is
        larger than ``dst_len`` (compressing saved space), checked by decoding
        the output again; else (0, 0), also when the library failed or its
        output does not decode to exactly that input.
        """
        self._consumed.value = src_len
        if self._state is None:
            out = self._dll.LZ4_compress_destSize(src, dst, self._consumed_ref, dst_len)
        else:
            out = self._dll.LZ4_compress_HC_destSize(
                self._state, src, dst, self._consumed_ref, dst_len, self._hc_level
            )
        consumed = self._consumed.value
        if out <= 0 or consumed <= dst_len:
            return 0, 0
        if len(self._check) < consumed:
            self._check = ctypes.create_string_buffer(max(consumed, 2 * len(self._check)))
            self._check_addr = ctypes.addressof(self._check)
        decoded = self._dll.LZ4_decompress_safe(dst, self._check_addr, out, consumed)
        if decoded != consumed or _memcmp(self._check_addr, src, consumed) != 0:
            return 0, 0
        return consumed, out
