"""EROFS layer images: build one from a directory, mount it, seal it, digest it.

An image is built by ``mkfs.erofs`` (erofs-utils) from an overlay upper
directory: its whiteouts (0/0 character devices) and opaque marks
(``trusted.overlay.opaque``) are copied like any device node and xattr, so
the mounted image works as an overlayfs lower layer unchanged.

Mounting tries the image file itself first (file-backed EROFS, Linux 6.12+,
and only for files whose filesystem reads through the page cache: tmpfs
files are refused). The kernel answers ENOTBLK where it cannot, and the
image is then put on a read-only loop device that goes away with the last
unmount, so nothing has to be detached later.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import subprocess
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from . import loop
from ._libc import StrPath
from .image import ToolFailed, find_tool
from .mount import mount, unmount
from .mountopts import MS_RDONLY
from .usage import fsync_path

__all__ = [
    "COMPRESSIONS",
    "ErofsImage",
    "build_image",
    "describe",
    "file_sha256",
    "find_mkfs",
    "is_immutable",
    "kernel_supports_erofs",
    "mkfs_compressors",
    "mount_image",
    "set_immutable",
    "supports_ztailpacking",
]

#: What ``compression`` may name: none, or a compressor every erofs-utils since 1.0 has.
COMPRESSIONS = ("none", "lz4", "lz4hc")

# The superblock sits at byte 1024: magic (le32) at 0, inode count (le64) at 16.
_SB_OFFSET = 1024
_SB_HEAD = struct.Struct("<I12xQ")
EROFS_MAGIC = 0xE0F5E1E2

# <linux/fs.h>: FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (long-sized argument) and the flag.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10
# What a filesystem without the flag answers: no such ioctl, or not this flag.
_NO_FLAGS = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


@dataclass(frozen=True)
class ErofsImage:
    """What a built image is: allocated bytes, inodes in it, and its sha256 (hex)."""

    allocated: int
    inodes: int
    sha256: str


def kernel_supports_erofs(filesystems: StrPath = "/proc/filesystems") -> bool:
    """Whether the running kernel knows the ``erofs`` filesystem (built in or loaded)."""
    try:
        text = Path(filesystems).read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["erofs"] for line in text.splitlines())


def mkfs_compressors(mkfs: str) -> frozenset[str]:
    """The compressors this ``mkfs.erofs`` was built with (from its ``--help``)."""
    # erofs-utils prints "Available compressors are: lz4hc, lz4" at the end of its help
    # (exit status 0 or 1 depending on the version).
    done = subprocess.run(
        [mkfs, "--help"], capture_output=True, text=True, errors="replace", check=False
    )
    for line in (done.stdout + done.stderr).splitlines():
        _, sep, tail = line.partition("compressors are:")
        if sep:
            return frozenset(w.strip() for w in tail.split(",") if w.strip())
    return frozenset()


def find_mkfs() -> str:
    """The path of ``mkfs.erofs``; MissingTool names the Debian package erofs-utils."""
    return find_tool("mkfs.erofs")


def build_image(
    source: StrPath,
    image: StrPath,
    compression: str = "none",
    extra: Sequence[str] = (),
    mkfs: str | None = None,
) -> ErofsImage:
    """Build ``image`` (must not exist) from the tree at ``source``, durably.

    The image is fsynced before this returns; its directory is not (the
    caller renames it into place and syncs that). A failed build leaves no
    file behind.
    """
    argv = [
        mkfs or find_mkfs(),
        "--quiet",
        # Without it erofs-utils 1.5 may store the build time instead of a file's own.
        "--preserve-mtime",
    ]
    # Inline tails stay on (unlike containerd's -Enoinline_data, which keeps data
    # block-aligned for its tar index mode): a layer of small files then takes
    # 20-30% less space.
    if compression != "none":
        argv.append(f"-z{compression}")
    argv += [*extra, os.fspath(image), os.fspath(source)]
    if os.path.lexists(image):
        raise FileExistsError(errno.EEXIST, "image exists already", os.fspath(image))
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace"
        )
        if done.returncode != 0:
            raise ToolFailed(argv, done.returncode, done.stderr or done.stdout)
        fsync_path(image)
        return describe(image)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(image)
        raise


#: mkfs.erofs option that stores compressed tails inline (Linux 5.17+ mounts them).
ZTAILPACKING = "-Eztailpacking"
_PROBE_DATA = b"stratasnap probe " * 1000 + b"tail"


def supports_ztailpacking(mkfs: str, scratch: StrPath) -> bool:
    """Whether this mkfs.erofs writes, and this kernel reads, inline compressed tails.

    Probed for real: a tiny lz4 image with the feature is built and mounted in
    the empty directory ``scratch`` (left empty again), and its file read back.
    """
    src, image, mnt = (Path(scratch) / n for n in ("src", "probe.erofs", "mnt"))
    os.mkdir(src)
    os.mkdir(mnt)
    try:
        (src / "f").write_bytes(_PROBE_DATA)
        try:
            build_image(src, image, "lz4", (ZTAILPACKING,), mkfs)
        except ToolFailed:
            return False  # an erofs-utils without the option (before 1.5)
        try:
            mount_image(image, mnt)
        except OSError:
            return False  # the kernel refuses the feature (EOPNOTSUPP before 5.17)
        try:
            return (mnt / "f").read_bytes() == _PROBE_DATA
        except OSError:
            return False
        finally:
            unmount(mnt)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(image)
        with suppress(FileNotFoundError):
            os.unlink(src / "f")
        os.rmdir(src)
        os.rmdir(mnt)


def describe(image: StrPath) -> ErofsImage:
    """Allocated size, inode count (from the superblock) and sha256 of an image."""
    with open(image, "rb") as f:
        st = os.fstat(f.fileno())
        f.seek(_SB_OFFSET)
        head = f.read(_SB_HEAD.size)
        if len(head) < _SB_HEAD.size:
            raise OSError(errno.EINVAL, "not an EROFS image (too short)", os.fspath(image))
        magic, inodes = _SB_HEAD.unpack(head)
        if magic != EROFS_MAGIC:
            raise OSError(errno.EINVAL, "not an EROFS image (bad magic)", os.fspath(image))
        f.seek(0)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return ErofsImage(allocated=st.st_blocks * 512, inodes=inodes, sha256=digest)


def file_sha256(path: StrPath) -> str:
    """The sha256 (hex) of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def mount_image(image: StrPath, target: StrPath) -> None:
    """Mount ``image`` read-only at ``target``: from the file, else through a loop device."""
    try:
        mount(image, target, "erofs", MS_RDONLY)
        return
    except OSError as e:
        if e.errno != errno.ENOTBLK:
            raise
    # Autoclear: the device is released with the last unmount of the filesystem.
    with loop.attached(image, readonly=True) as dev:
        mount(dev, target, "erofs", MS_RDONLY)


def _get_flags(fd: int) -> int | None:
    buf = bytearray(struct.pack("l", 0))
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    except OSError as e:
        if e.errno in _NO_FLAGS:
            return None
        raise
    flags: int = struct.unpack("l", buf)[0]
    return flags


def _open_flags_fd(path: StrPath) -> int:
    # O_NONBLOCK: never hang on a fifo planted where a file was expected.
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)


def set_immutable(path: StrPath, on: bool) -> bool:
    """Set or clear FS_IMMUTABLE_FL on a file; False where its filesystem has no such flag.

    Needs CAP_LINUX_IMMUTABLE (EPERM otherwise, raised).
    """
    fd = _open_flags_fd(path)
    try:
        flags = _get_flags(fd)
        if flags is None:
            return False
        new = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if new == flags:
            return True
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", new))
        except OSError as e:
            if e.errno in _NO_FLAGS:
                return False
            raise
        return True
    finally:
        os.close(fd)


def is_immutable(path: StrPath) -> bool:
    """Whether FS_IMMUTABLE_FL is set on a file (False where the filesystem has no flags)."""
    fd = _open_flags_fd(path)
    try:
        flags = _get_flags(fd)
    finally:
        os.close(fd)
    return bool(flags and flags & FS_IMMUTABLE_FL)
