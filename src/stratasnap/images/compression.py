"""Layer (de)compression: gzip (ISA-L's ``isal`` when installed, else zlib), zstd, none.

:class:`DecompressingReader` turns a compressed stream into a readable
uncompressed one with bounded memory per read (a decompression bomb costs
time, not memory), handles concatenated gzip members and zstd frames, and
raises on a truncated stream instead of returning short data.
"""

from __future__ import annotations

import io
import types
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

import zstandard

from ..errors import InvalidArgument

_gzip_impl: types.ModuleType
try:  # ISA-L inflates gzip about 3x faster than zlib; optional
    from isal import isal_zlib

    _gzip_impl = isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency, but may fail to build
    _gzip_impl = zlib

__all__ = ["COMPRESSIONS", "DecompressingReader", "compressor", "gzip_backend", "sniff_compression"]

COMPRESSIONS = ("none", "gzip", "zstd")
_IN_CHUNK = 64 << 10


_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))


def sniff_compression(head: bytes) -> str:
    """The compression a blob starting with ``head`` (4 bytes suffice) uses.

    For blobs whose media type is not at hand (containerd's fast path gets a
    digest only). A tar starts with a file name, never with these magics.
    """
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return "none"


class _Decomp(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, /, *args: Any) -> bytes: ...


def gzip_backend() -> str:
    """Which library inflates gzip here: ``isal`` or ``zlib``."""
    return "zlib" if _gzip_impl is zlib else "isal"


def _new_gzip() -> _Decomp:
    obj: _Decomp = _gzip_impl.decompressobj(wbits=31)
    return obj


def _new_zstd() -> _Decomp:
    obj: _Decomp = zstandard.ZstdDecompressor().decompressobj()
    return obj


class DecompressingReader(io.RawIOBase):
    """Reads ``source`` (compressed with ``compression``) as uncompressed bytes."""

    def __init__(self, source: BinaryIO, compression: str, what: str = "layer") -> None:
        super().__init__()
        if compression not in COMPRESSIONS:
            raise InvalidArgument(f"unknown compression {compression!r}")
        self._src = source
        self._what = what
        self._kind = compression
        self._factory: Callable[[], _Decomp] | None = {
            "gzip": _new_gzip,
            "zstd": _new_zstd,
            "none": None,
        }[compression]
        self._obj = self._factory() if self._factory else None
        self._pending = b""  # compressed input not yet given to the decompressor
        self._started = False  # a member/frame has begun (so EOF now means truncation)
        self._done = False
        self._spill = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readall(self) -> bytes:
        # RawIOBase's readall would ask for 8 KiB at a time.
        parts = []
        while chunk := self.read(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._obj is None:
            return self._src.readinto(view)  # type: ignore[attr-defined,no-any-return]
        if not self._spill:
            while not self._done:
                self._spill = memoryview(self._step(len(view)))
                if self._spill:
                    break
        # zstd's decompressobj has no output bound: what does not fit waits here.
        n = min(len(view), len(self._spill))
        view[:n] = self._spill[:n]
        self._spill = self._spill[n:]
        return n

    def _step(self, want: int) -> bytes:
        assert self._obj is not None and self._factory is not None
        obj = self._obj
        if obj.eof:
            rest = obj.unused_data + self._pending
            self._pending = b""
            if not rest:
                rest = self._src.read(_IN_CHUNK)
            if not rest:
                self._done = True
                return b""
            if self._kind == "gzip" and not rest.strip(b"\0"):
                self._done = True  # zero padding after the last member, as gzip(1) allows
                return b""
            self._obj = obj = self._factory()
            self._pending = rest
        data = self._pending or self._src.read(_IN_CHUNK)
        self._pending = b""
        if not data:
            if self._started or self._kind == "zstd":
                raise InvalidArgument(f"{self._what}: {self._kind} stream is truncated")
            self._done = True  # an empty blob
            return b""
        self._started = True
        try:
            if self._kind == "gzip":
                out = obj.decompress(data, want)
                self._pending = obj.unconsumed_tail  # type: ignore[attr-defined]
            else:
                out = obj.decompress(data)
        except (zlib.error, zstandard.ZstdError, OSError) as exc:
            raise InvalidArgument(f"{self._what}: corrupt {self._kind} data: {exc}") from None
        except Exception as exc:  # isal raises its own error class
            if type(exc).__name__ == "IsalError":
                raise InvalidArgument(f"{self._what}: corrupt gzip data: {exc}") from None
            raise
        return out


def compressor(compression: str, level: int | None = None) -> Callable[[BinaryIO], BinaryIO]:
    """A function wrapping a writable binary stream so that what is written is compressed."""
    if compression == "none":
        return lambda f: f
    if compression == "gzip":
        import gzip

        lvl = 6 if level is None else level

        def gz(f: BinaryIO) -> BinaryIO:
            return gzip.GzipFile(fileobj=f, mode="wb", compresslevel=lvl, mtime=0)  # type: ignore[return-value]

        return gz
    if compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=3 if level is None else level)
        return lambda f: cctx.stream_writer(f, closefd=False)
    raise InvalidArgument(f"unknown compression {compression!r} (gzip, zstd or none)")
