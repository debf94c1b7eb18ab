"""A one-pass reader of (uncompressed) layer tars: ustar, GNU long names, PAX.

The one tar reader of stratasnap: the layer applier (``images.apply``) and the
tar -> EROFS converter (``erofs.writer``) both read layers through it.

Why not :mod:`tarfile`: it parses a header field by field in Python and its
stream mode copies data through small buffers (tens of microseconds per
member, ``benchmarks/tarstream.py``); this reader takes the number fields in
one ``struct`` call and one octal pass, hands file data straight to the caller
(``readinto`` into the caller's buffer, or a kernel-side copy when the tar is a
regular file), and checks every field a hostile archive could abuse, raising
:mod:`.errors` types instead of guessing. Extended headers are bounded, so a
hostile layer cannot make us hold gigabytes in memory.

Member semantics follow Go's archive/tar as containerd uses it: links,
symlinks, devices, directories and fifos carry no data whatever their size
field says; a stream that ends cleanly at a header boundary is a valid end
even without the two zero blocks; PAX global headers are skipped (containerd
ignores them); GNU sparse and volume members are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import struct
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO
from zlib import adler32

from .errors import LayerTooLarge, TarFormatError, TruncatedTar, UnsupportedEntry

__all__ = [
    "BLK",
    "CHR",
    "DIR",
    "FIFO",
    "HARDLINK",
    "MAX_FILE_SIZE",
    "MAX_LONGNAME_SIZE",
    "MAX_PAX_SIZE",
    "REG",
    "SYMLINK",
    "TarEntry",
    "TarReader",
]

RECORD = 512
MAX_FILE_SIZE = 1 << 44  # 16 TiB: more than an image with 32-bit block numbers can hold
MAX_PAX_SIZE = 16 << 20  # extended headers carry names and xattrs (each xattr <= 64 KiB)
MAX_LONGNAME_SIZE = 1 << 16
MAX_ID = 0xFFFFFFFF

REG, HARDLINK, SYMLINK, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_HEADER_ONLY = frozenset((HARDLINK, SYMLINK, CHR, BLK, DIR, FIFO))
_MEMBER_TYPES = frozenset((REG, HARDLINK, SYMLINK, CHR, BLK, DIR, FIFO))
_ZERO_RECORD = bytes(RECORD)
_XATTR_PAX = b"SCHILY.xattr."
_XATTR_LIBARCHIVE = b"LIBARCHIVE.xattr."
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
}


def _regular_file_fd(stream: BinaryIO) -> int | None:
    """The descriptor of ``stream`` if it is a plain open regular file, else None.

    Only a plain ``open(path, "rb")`` object qualifies: wrappers such as
    ``gzip.GzipFile`` also answer ``fileno()`` and ``seekable()``, but with the
    descriptor of the *compressed* file, whose bytes are not the tar's.
    """
    raw = stream.raw if type(stream) is io.BufferedReader else stream
    if type(raw) is not io.FileIO:
        return None
    try:
        fd = stream.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) and stream.seekable() else None
    except (OSError, ValueError, AttributeError):  # io.BytesIO and friends have no descriptor
        return None


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One member, with PAX and GNU long-name records already applied."""

    name: bytes  # as archived: not yet normalised or checked for safety
    type: bytes  # one of REG, HARDLINK, SYMLINK, CHR, BLK, DIR, FIFO
    mode: int  # permission bits incl. setuid/setgid/sticky (07777)
    uid: int
    gid: int
    size: int  # data bytes that follow (0 for header-only types)
    mtime: int
    mtime_nsec: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[bytes, bytes], ...]
    offset: int  # where the member's header starts in the stream, for messages

    @property
    def mtime_ns(self) -> int:
        return self.mtime * 1_000_000_000 + self.mtime_nsec


def _cstr(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _number(field: bytes, what: str, offset: int) -> int:
    if field[0] < 0x80:
        try:  # the common case: octal digits, NUL- or space-terminated
            return int(field.split(b"\0", 1)[0], 8)
        except ValueError:
            pass  # empty or all spaces (0), or really malformed: the slow path decides
    elif field[0] & 0x80:  # base-256 (GNU/star) for values octal cannot hold
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 1 << (8 * (len(field) - 1))
        elif field[0] != 0x80:
            raise TarFormatError(f"bad base-256 {what} field", offset=offset)
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"bad octal {what} field {text!r}", offset=offset) from None


# One struct call splits a header: name, mode, uid, gid, size, mtime, chksum, type,
# linkname, magic (6 bytes, version skipped), devmajor, devminor, prefix (uname and
# gname are skipped: layers carry numeric owners).
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s66x8s8s155s12x")
_NUMBER_NAMES = ("mode", "uid", "gid", "size", "mtime")
_Fields = tuple[bytes, ...]


def _header_numbers(fields: _Fields, block: bytes, offset: int) -> tuple[int, int, int, int, int]:
    """mode, uid, gid, size and mtime of a header (``fields`` unpacked from ``block``)
    whose checksum is right."""
    try:  # the common case: every field octal digits, NUL- or space-terminated
        mode, uid, gid, size, mtime, stored = [int(x.split(b"\0", 1)[0], 8) for x in fields[1:7]]
    except ValueError:  # empty, base-256 or malformed: the checksum first, then field by field
        try:
            stored = _number(fields[6], "checksum", offset)
        except TarFormatError:
            stored = -1  # not even a number (text, not a tar): a checksum mismatch below
        _check_sum(block, stored, offset)
        mode, uid, gid, size, mtime = [
            _number(x, n, offset) for x, n in zip(fields[1:6], _NUMBER_NAMES, strict=True)
        ]
        return mode, uid, gid, size, mtime
    _check_sum(block, stored, offset)
    return mode, uid, gid, size, mtime


def _byte_sum(block: bytes) -> int:
    """sum(block) of a 512-byte record, in C: adler32's low half is 1 + the byte sum
    modulo 65521, exact for 256 bytes (at most 65280). ``sum()`` iterates in Python
    and was a fifth of the parsing time (benchmarks/tarstream.py)."""
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _check_sum(block: bytes, stored: int, offset: int) -> None:
    unsigned = _byte_sum(block) - sum(block[148:156]) + 256  # the field counts as 8 spaces
    if stored == unsigned:
        return
    high = sum(1 for i, b in enumerate(block) if b & 0x80 and not 148 <= i < 156)
    signed = unsigned - 256 * high  # some old writers summed the bytes as int8
    if stored != signed:
        raise TarFormatError("header checksum mismatch (not a tar, or corrupt)", offset=offset)


def _pax_records(data: bytes, offset: int) -> dict[bytes, bytes]:
    """``"%d %s=%s\\n"`` records; a later record of a key wins."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record
        space = data.find(b" ", pos, pos + 21)
        length_text = data[pos:space] if space > pos else b""
        if not length_text.isdigit():
            raise TarFormatError("bad PAX record length", offset=offset)
        length = int(length_text)
        end = pos + length
        if end > len(data) or length <= space - pos + 1 or data[end - 1] != 0x0A:
            raise TarFormatError("bad PAX record", offset=offset)
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise TarFormatError("PAX record without key=value", offset=offset)
        out[key] = value
        pos = end
    return out


def _pax_xattrs(pax: dict[bytes, bytes], offset: int) -> tuple[tuple[bytes, bytes], ...]:
    """xattrs as Go and GNU tar write them (SCHILY.xattr.NAME=raw value) and as
    libarchive does (LIBARCHIVE.xattr.URL-ENCODED-NAME=base64 value)."""
    out = []
    for key, value in pax.items():
        if key.startswith(_XATTR_PAX):
            out.append((key[len(_XATTR_PAX) :], value))
        elif key.startswith(_XATTR_LIBARCHIVE):
            try:
                name = urllib.parse.unquote_to_bytes(key[len(_XATTR_LIBARCHIVE) :])
                out.append(
                    (name, base64.b64decode(value + b"=" * (-len(value) % 4), validate=True))
                )
            except binascii.Error:
                raise TarFormatError(f"bad base64 in PAX record {key!r}", offset=offset) from None
    return tuple(out)


def _pax_time(value: bytes, offset: int) -> tuple[int, int]:
    text = value.decode("ascii", "replace")
    neg = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise TarFormatError(f"bad PAX mtime {text!r}", offset=offset)
    nsec = int((frac + "000000000")[:9]) if frac else 0
    sec = int(whole)
    if neg:  # -1.5 is 1.5 s before the epoch: -2 s + 0.5e9 ns
        sec, nsec = (-sec, 0) if nsec == 0 else (-sec - 1, 1_000_000_000 - nsec)
    return sec, nsec


def _pax_int(value: bytes, what: str, limit: int, offset: int) -> int:
    if not value.isdigit():
        raise TarFormatError(f"bad PAX {what} {value!r}", offset=offset)
    number = int(value)
    if number > limit:
        raise LayerTooLarge(f"PAX {what} {number} is too large", offset=offset)
    return number


class TarReader:
    """Iterate members of ``stream``; read each regular file's data before the next.

    ``for entry in reader: ... reader.readinto(buf)`` — data not read by the
    caller is skipped when iteration continues. ``stream`` may be a pipe.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._f = stream
        self.position = 0  # bytes consumed from the stream
        self._remaining = 0  # data bytes of the current member not yet read
        self._padding = 0  # record padding after the current member's data
        self._src_fd = _regular_file_fd(stream)

    # -- raw stream -----------------------------------------------------
    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            parts = [data]
            got = len(data)
            while got < n:
                more = self._f.read(n - got)
                if not more:
                    raise TruncatedTar(
                        f"stream ended inside {what} ({got} of {n} bytes)",
                        offset=self.position + got,
                    )
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.position += n
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            step = min(n, 1 << 20)
            self._read_exact(step, "member data")
            n -= step

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member's data (exactly n if it has them)."""
        n = min(n, self._remaining)
        if not n:  # the caller's "is there more?" call: no stream call at all
            return b""
        data = self._read_exact(n, "member data")
        self._remaining -= n
        return data

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` (or what is left of the member's data); returns the count."""
        got = self.readinto_exact(buf[: min(len(buf), self._remaining)])
        self._remaining -= got
        return got

    def readinto_padded(self, buf: memoryview) -> None:
        """Read all the member's data and its record padding into ``buf``.

        One read instead of two for small files; ``buf`` must hold both, and
        the caller must not rely on the padding bytes (overwrite them).
        """
        want = self._remaining + self._padding
        if want:
            self.readinto_exact(buf[:want])
        self._remaining = self._padding = 0

    def readinto_exact(self, buf: memoryview) -> int:
        """Fill all of ``buf`` from the stream (not bounded by the member)."""
        want, got = len(buf), 0
        readinto = self._f.readinto  # type: ignore[attr-defined]
        while got < want:
            n = readinto(buf[got:])
            if not n:
                raise TruncatedTar(
                    f"stream ended inside member data ({want - got} bytes missing)",
                    offset=self.position + got,
                )
            got += n
        self.position += got
        return got

    def drain(self) -> None:
        """Read the stream to its end (the record padding after the end marker).

        Callers that hash the stream while it is read (to check a diff ID)
        need every byte to pass through; a pipe's writer must not see EPIPE.
        """
        while chunk := self._f.read(1 << 16):
            self.position += len(chunk)

    def skip_in_file(self, n: int) -> tuple[int, int] | None:
        """Pass over ``n`` data bytes of a tar that is a regular file, unread.

        Returns (descriptor, offset) where those bytes are, for the caller to
        copy inside the kernel; None (nothing consumed) for other streams.
        """
        if self._src_fd is None or n > self._remaining:
            return None
        pos = self._f.tell()
        if os.fstat(self._src_fd).st_size < pos + n:
            raise TruncatedTar(
                f"stream ended inside member data ({n} bytes wanted)", offset=self.position
            )
        self._f.seek(pos + n)
        self.position += n
        self._remaining -= n
        return self._src_fd, pos

    # -- members --------------------------------------------------------
    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            if self._remaining or self._padding:
                self._skip(self._remaining + self._padding)
                self._remaining = self._padding = 0
            entry = self._next()
            if entry is None:
                return
            yield entry

    def _header(self) -> bytes | None:
        first = self._f.read(RECORD)
        if not first:
            return None  # a clean end at a record boundary (Go accepts it too)
        start = self.position
        self.position += len(first)
        if len(first) < RECORD:
            try:
                first += self._read_exact(RECORD - len(first), "a tar header")
            except TruncatedTar:
                if start == 0:  # shorter than one header: perhaps the usual mistake
                    self._not_compressed(first)
                raise
        return first

    def _next(self) -> TarEntry | None:
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            offset = self.position
            block = self._header()
            if block is None or block == _ZERO_RECORD:  # clean end, or the end marker
                if pax or long_name is not None or long_link is not None:
                    raise TruncatedTar("archive ends after an extended header", offset=offset)
                return None
            fields = _HEADER.unpack(block)
            try:
                mode, uid, gid, size, mtime = _header_numbers(fields, block, offset)
            except TarFormatError:
                if offset == 0:  # not a tar: say so if it is the usual mistake
                    self._not_compressed(block)
                raise
            typ = fields[7]
            if size < 0 or size > MAX_FILE_SIZE:
                raise LayerTooLarge(f"member size {size} is out of range", offset=offset)
            if typ in (b"x", b"g", b"L", b"K"):
                limit = MAX_LONGNAME_SIZE if typ in (b"L", b"K") else MAX_PAX_SIZE
                if size > limit:
                    raise LayerTooLarge(f"{typ.decode()} record of {size} bytes", offset=offset)
                data = self._read_exact(size, "an extended header")
                self._skip(-size % RECORD)
                if typ == b"x":
                    pax.update(_pax_records(data, offset))
                elif typ == b"g":
                    _pax_records(data, offset)  # checked, not applied (as containerd)
                elif typ == b"L":
                    long_name = _cstr(data)
                else:
                    long_link = _cstr(data)
                continue
            return self._member(
                fields, typ, (mode, uid, gid, size, mtime), offset, pax, long_name, long_link
            )

    @staticmethod
    def _not_compressed(block: bytes) -> None:
        for magic, name in _COMPRESSED.items():
            if block.startswith(magic):
                raise TarFormatError(
                    f"the input is {name}-compressed; decompress it first (this reads plain tar)",
                    offset=0,
                )

    def _member(
        self,
        fields: _Fields,
        typ: bytes,
        numbers: tuple[int, int, int, int, int],
        offset: int,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarEntry:
        mode, uid, gid, size, mtime = numbers
        mtime_nsec = 0
        name = _cstr(fields[0])
        if fields[9] == b"ustar\0":  # POSIX ustar: a name prefix (GNU uses those bytes)
            prefix = _cstr(fields[12])
            if prefix:
                name = prefix + b"/" + name
        if typ in (b"\0", b"7"):  # old-style regular file, contiguous file
            typ = DIR if name.endswith(b"/") and typ == b"\0" else REG
        if typ == b"S" or (pax and any(k.startswith(b"GNU.sparse.") for k in pax)):
            raise UnsupportedEntry("sparse members are not supported", offset=offset)
        if typ not in _MEMBER_TYPES:
            raise UnsupportedEntry(f"unsupported member type {typ!r}", offset=offset)
        if long_name is not None:
            name = long_name
        linkname = _cstr(fields[8]) if long_link is None else long_link
        xattrs: tuple[tuple[bytes, bytes], ...] = ()
        if pax:
            name = pax.get(b"path", name)
            linkname = pax.get(b"linkpath", linkname)
            if b"size" in pax:
                size = _pax_int(pax[b"size"], "size", MAX_FILE_SIZE, offset)
            if b"uid" in pax:
                uid = _pax_int(pax[b"uid"], "uid", MAX_ID, offset)
            if b"gid" in pax:
                gid = _pax_int(pax[b"gid"], "gid", MAX_ID, offset)
            if b"mtime" in pax:
                mtime, mtime_nsec = _pax_time(pax[b"mtime"], offset)
            xattrs = _pax_xattrs(pax, offset)
        if not 0 <= uid <= MAX_ID or not 0 <= gid <= MAX_ID:
            raise TarFormatError(f"owner {uid}:{gid} is out of range", offset=offset)
        devmajor = devminor = 0
        if typ in (CHR, BLK):
            devmajor = _number(fields[10], "devmajor", offset)
            devminor = _number(fields[11], "devminor", offset)
            if not 0 <= devmajor < 1 << 12 or not 0 <= devminor < 1 << 20:
                raise TarFormatError(f"device {devmajor}:{devminor} is out of range", offset=offset)
        if typ in _HEADER_ONLY:
            size = 0
        self._remaining = size
        self._padding = -size % RECORD
        mode &= 0o7777
        return TarEntry(
            name, typ, mode, uid, gid, size, mtime, mtime_nsec, linkname,
            devmajor, devminor, xattrs, offset,
        )  # fmt: skip
