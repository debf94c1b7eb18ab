"""``convert_tar``: one pass over a layer tar, an EROFS image out.

File data goes to the image as it arrives (see :mod:`.datawriter`); only
metadata is kept in memory and written after the data (see
:mod:`.layout`). The image is built under a temporary name next to the
target, fsynced, and renamed into place: on any error nothing is left behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from ..errors import from_os_error
from ..tarstream import (
    BLK,
    CHR,
    DIR,
    FIFO,
    HARDLINK,
    REG,
    SYMLINK,
    TarEntry,
    TarFormatError,
    TarReader,
    split_name,
)
from . import format as fmt
from .compressed_writer import CompressedRegion
from .datawriter import DataRegion
from .layout import write_metadata
from .lz4 import HC_DEFAULT_LEVEL, Lz4, library_error
from .tree import NO_XATTRS, WHITEOUT_PREFIX, Node, Tree

__all__ = ["COMPRESSIONS", "ImageStats", "convert_tar"]

#: The ``compression`` values convert_tar accepts here: "none" (plain block
#: runs), and where liblz4 (>= 1.9.3) loads, "lz4" and "lz4hc" (level 9: about
#: 8% smaller than lz4 for about 4x its CPU when writing; as fast to read).
COMPRESSIONS: tuple[str, ...] = ("none",) if library_error() else ("none", "lz4", "lz4hc")
_HC_LEVELS = {"lz4": None, "lz4hc": HC_DEFAULT_LEVEL}

BS = fmt.BLOCK_SIZE
_TYPE_BITS = {
    REG: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    CHR: stat.S_IFCHR,
    BLK: stat.S_IFBLK,
    FIFO: stat.S_IFIFO,
}


@dataclass(frozen=True)
class ImageStats:
    """What a conversion read and wrote."""

    tar_bytes: int  # bytes consumed from the stream (all of it: read to EOF)
    data_bytes: int  # regular-file bytes stored
    image_bytes: int  # size of the image file
    inodes: int
    files: int  # regular-file tar members (hard links not counted)
    directories: int
    symlinks: int
    hardlinks: int  # hard-link members
    devices: int  # char/block devices and fifos from the tar (whiteouts not counted)
    whiteouts: int  # .wh.NAME turned into 0/0 character devices
    opaque_dirs: int  # .wh..wh..opq turned into trusted.overlay.opaque=y
    extended_inodes: int
    compressed_files: int  # regular files stored compressed (the others gained nothing)
    shared_xattrs: int
    # xattrs EROFS cannot hold (a prefix other than user./trusted./security./POSIX ACLs,
    # or a value over 64 KiB), left out as containerd's applier leaves out what
    # setxattr refuses
    dropped_xattrs: int
    tar_digest: str = ""  # "sha256:<hex>" of the whole stream when asked for (the diff ID)


class _Sha256Stream:
    """Hashes what the tar reader reads. It has no fileno(), so no kernel-side copy skips it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self.hash.update(data)
        return data

    def readinto(self, buf: memoryview) -> int:
        n: int = self._stream.readinto(buf)  # type: ignore[attr-defined]
        if n:
            self.hash.update(buf[:n])
        return n


class _Converter:
    def __init__(self, fd: int, default_mtime: int | None, compression: str) -> None:
        self.tree = Tree(default_mtime)
        self.data: DataRegion | CompressedRegion = (
            DataRegion(fd)
            if compression == "none"
            else CompressedRegion(fd, lambda: Lz4(_HC_LEVELS[compression]))
        )
        self._interned: dict[int, int] = {}
        self.counts = dict.fromkeys(
            ("files", "directories", "symlinks", "hardlinks", "devices", "whiteouts", "opaque"), 0
        )

    def apply(self, reader: TarReader, e: TarEntry) -> None:
        parts = split_name(e.name, e.offset)
        if e.type == HARDLINK:
            self._hardlink(parts, e)
            return
        is_dir = e.type == DIR
        # Layers repeat the same few modes and times: share the int objects
        # (28 bytes each per inode otherwise), as NO_XATTRS shares the empty dict.
        node = Node(
            self._share(_TYPE_BITS[e.type] | e.mode),
            e.uid,
            e.gid,
            self._share(e.mtime),
            e.mtime_nsec,
            dict(e.xattrs) if e.xattrs or is_dir else NO_XATTRS,
            children={} if is_dir else None,
        )
        if not parts:
            self.tree.set_root(node, e.offset)
            return
        if parts[-1].startswith(WHITEOUT_PREFIX):
            kind = self.tree.whiteout(parts, node, e.offset)
            if kind == "opaque":
                self.counts["opaque"] += 1
            elif kind == "whiteout":
                self.counts["whiteouts"] += 1
            return
        if e.type == REG:
            node.size = e.size
            self.data.add(reader, node)
            self.counts["files"] += 1
        elif e.type == SYMLINK:
            if not e.linkname or b"\0" in e.linkname or len(e.linkname) >= 4096:
                raise TarFormatError(f"symlink {e.name!r} has a bad target", offset=e.offset)
            node.target = e.linkname
            # As on any extracted Linux tree: symlink permissions cannot be set.
            node.mode = stat.S_IFLNK | 0o777
            self.counts["symlinks"] += 1
        elif e.type in (CHR, BLK):
            node.rdev = fmt.encode_rdev(e.devmajor, e.devminor)
            self.counts["devices"] += 1
        elif e.type == FIFO:
            self.counts["devices"] += 1
        else:
            self.counts["directories"] += 1
        self.tree.put(parts, node, e.offset)

    def _share(self, value: int) -> int:
        """``value``, as the same object as the last equal one (for the first 4096 values)."""
        shared = self._interned.get(value)
        if shared is not None:
            return shared
        if len(self._interned) < 4096:  # a layer of all-different times must not grow this
            self._interned[value] = value
        return value

    def _hardlink(self, parts: tuple[bytes, ...], e: TarEntry) -> None:
        target_parts = split_name(e.linkname, e.offset)
        target = self.tree.lookup(target_parts)
        if target is None or not parts:
            raise TarFormatError(
                f"hard link {e.name!r} -> {e.linkname!r}: target not in the layer", offset=e.offset
            )
        if target.is_dir:
            raise TarFormatError(f"hard link {e.name!r} to a directory", offset=e.offset)
        self.counts["hardlinks"] += 1
        if target_parts != parts:
            self.tree.put(parts, target, e.offset)


def convert_tar(
    stream: BinaryIO,
    out_path: str | os.PathLike[str],
    *,
    uuid: bytes | None = None,
    volume_name: bytes = b"",
    default_mtime: int | None = None,
    digest: bool = False,
    compression: str = "none",
) -> ImageStats:
    """Read an uncompressed layer tar from ``stream`` once; write an EROFS image.

    ``stream`` may be non-seekable (a pipe, a decompressor's output). The image
    has 4 KiB blocks, regular-file data in plain block runs (as containerd's
    ``mkfs.erofs -Enoinline_data``) or, with ``compression`` "lz4"/"lz4hc",
    compressed into 4 KiB clusters where that saves space, whiteouts in overlayfs form,
    fsynced and renamed into place at ``out_path`` (replacing a file there).
    ``uuid`` (16 bytes) defaults to random; ``default_mtime`` is the time given
    to parent directories the tar does not list (default: the newest mtime of
    any member, so that the same tar always gives the same image). With ``digest`` the stream is
    hashed as it is read and ``ImageStats.tar_digest`` is ``"sha256:<hex>"``:
    the layer's diff ID, for chain IDs, without a second pass.

    ``compression`` is one of :data:`COMPRESSIONS` (ValueError otherwise):
    "lz4" costs CPU when written and read and saves disk on compressible
    files; files it does not shrink stay plain (see ``pclusters``).

    Raises :class:`~stratasnap.tarstream.TarFormatError` (an InvalidArgument)
    for a malformed or hostile tar, ResourceExhausted when the disk is full.
    """
    if compression not in COMPRESSIONS:
        why = f" ({library_error()})" if compression in _HC_LEVELS else ""
        raise ValueError(
            f"compression {compression!r}: the converter writes {', '.join(COMPRESSIONS)}{why}"
        )
    if uuid is None:
        uuid = secrets.token_bytes(16)
    if len(uuid) != 16 or len(volume_name) > 16:
        raise ValueError("uuid must be 16 bytes and volume_name at most 16")
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise from_os_error(exc, f"creating {tmp}") from exc
    conv: _Converter | None = None
    try:
        hashed = _Sha256Stream(stream) if digest else None
        reader = TarReader(cast(BinaryIO, hashed) if hashed else stream)
        conv = _Converter(fd, default_mtime, compression)
        for entry in reader:
            conv.apply(reader, entry)
        reader.drain()
        conv.tree.finish()
        conv.data.finish()
        meta = write_metadata(fd, conv.tree.root, conv.data.next_block, uuid, volume_name)
        os.fsync(fd)
    except BaseException as exc:
        if conv is not None:
            conv.data.abort()  # the writer thread must be gone before fd is closed
        os.close(fd)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise from_os_error(exc, f"converting a layer tar into {out}") from exc
        raise
    os.close(fd)
    try:
        os.replace(tmp, out)
        dfd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)  # the rename itself must survive a crash too
        finally:
            os.close(dfd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise from_os_error(exc, f"installing {out}") from exc
    c = conv.counts
    return ImageStats(
        tar_bytes=reader.position,
        data_bytes=conv.data.data_bytes,
        image_bytes=meta.blocks * BS,
        inodes=meta.inodes,
        files=c["files"],
        directories=c["directories"],
        symlinks=c["symlinks"],
        hardlinks=c["hardlinks"],
        devices=c["devices"],
        whiteouts=c["whiteouts"],
        opaque_dirs=c["opaque"],
        extended_inodes=meta.extended_inodes,
        compressed_files=meta.compressed_files,
        shared_xattrs=meta.shared_xattrs,
        dropped_xattrs=meta.dropped_xattrs,
        tar_digest=f"sha256:{hashed.hash.hexdigest()}" if hashed else "",
    )
