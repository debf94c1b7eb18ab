"""Size-limited directories: a sparse ext4 image, loop-mounted where the directory goes.

Without quota support in the kernel, the only way to cap what a writable
layer may hold is to give it a filesystem of its own. The image is sparse,
so it takes host space only as it fills; ``mkfs.ext4`` with lazy
initialisation makes even a large one in a few milliseconds (python-baselines
4d), and attaching it with ``LOOP_CONFIGURE`` costs about a millisecond.

The filesystem's own metadata (journal, inode tables, bitmaps) is added on
top of the requested size, so that the requested number of bytes of files
fits and about that many more do not.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from dataclasses import dataclass

from . import loop
from ._libc import StrPath, fsencode, os_error, syscall
from .mount import mount, unmount

__all__ = [
    "MIN_SIZE",
    "FsUse",
    "fs_use",
    "image_size",
    "make_ext4",
    "mount_image",
    "move_mount_to",
]

MiB = 1 << 20
GiB = 1 << 30
#: Smallest limit: ext4 needs room for a journal plus some data.
MIN_SIZE = 8 * MiB
#: Largest limit: ext4 with 4 KiB blocks and no 64bit-only trickery.
MAX_SIZE = 1 << 50
_BLOCK = 4096
# One 256-byte inode per 16 KiB of data (mke2fs' default ratio): 1/64 of the size.
_INODE_RATIO = 16384
_INODE_SIZE = 256
# Bitmaps, group descriptors, root and lost+found: well under this.
_SLACK = 1 * MiB
_MKFS_TIMEOUT_S = 120
AT_FDCWD = -100
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 4


@dataclass(frozen=True)
class FsUse:
    """Used bytes and inodes of a whole filesystem, from ``statvfs``."""

    size: int
    inodes: int


def _journal_bytes(limit: int) -> int:
    # mke2fs' own choice grows in steps with the size; fixed steps here keep
    # the overhead predictable (and the image size computable up front).
    if limit < GiB:
        return 4 * MiB
    if limit < 16 * GiB:
        return 32 * MiB
    return 128 * MiB


def image_size(limit: int) -> int:
    """Bytes of image for a filesystem that holds about ``limit`` bytes of files."""
    raw = limit + _journal_bytes(limit) + limit * _INODE_SIZE // _INODE_RATIO + _SLACK
    return -(-raw // _BLOCK) * _BLOCK


def make_ext4(image: StrPath, limit: int) -> None:
    """Create ``image`` (must not exist): sparse, with an ext4 filesystem for ``limit`` bytes.

    Raises OSError (ENOENT when ``mkfs.ext4`` is missing, EIO with its
    message when it fails); a half-made image is removed.
    """
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs is None:
        raise os_error(errno.ENOENT, image, "mkfs.ext4 not found (install e2fsprogs)")
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, image_size(limit))
    finally:
        os.close(fd)
    args = [
        mkfs,
        "-q",
        "-F",
        "-m0",  # no blocks reserved for root: the limit is the limit
        f"-b{_BLOCK}",  # mke2fs picks 1 KiB blocks for small filesystems otherwise
        f"-I{_INODE_SIZE}",
        f"-i{_INODE_RATIO}",
        f"-Jsize={_journal_bytes(limit) // MiB}",
        "-O^resize_inode",  # never grown online: no reserved descriptor blocks
        # Lazy init: the kernel zeroes inode tables in the background; the
        # loop device turns those zeroes into holes, so the image stays sparse.
        "-Enodiscard,lazy_itable_init=1,lazy_journal_init=1",
        os.fspath(image),
    ]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=_MKFS_TIMEOUT_S)
    except BaseException:
        os.unlink(image)
        raise
    if done.returncode != 0:
        os.unlink(image)
        message = (done.stderr or done.stdout).strip().replace("\n", "; ")
        raise os_error(errno.EIO, image, f"mkfs.ext4 failed: {message}")


def mount_image(image: StrPath, target: StrPath, fstype: str = "ext4", data: str = "") -> None:
    """Attach ``image`` to a loop device and mount it at ``target``.

    The device is attached with autoclear: it goes away with the last
    unmount of its filesystem (including the private clones overlayfs keeps
    of its upper layer), so nothing has to detach it later.
    """
    with loop.attached(image) as dev:
        mount(dev, target, fstype, 0, data)


def move_mount_to(source: StrPath, target: StrPath) -> None:
    """Move the mount at ``source`` to ``target`` without letting go of its filesystem.

    ``mount(MS_MOVE)`` refuses when the mount sits under a shared mount
    (the usual case under systemd), so the mount is cloned with
    ``open_tree``, the original unmounted, and the clone attached at
    ``target``. The clone holds the superblock throughout, so the unmount
    neither syncs nor tears down the filesystem: an ext4 unmount plus a
    fresh mount cost 10-30 ms here, this well under one.
    """
    fd = syscall(
        "open_tree", AT_FDCWD, fsencode(source), OPEN_TREE_CLONE | os.O_CLOEXEC, path=source
    )
    try:
        unmount(source)
        syscall(
            "move_mount", fd, b"", AT_FDCWD, fsencode(target), MOVE_MOUNT_F_EMPTY_PATH, path=target
        )
    finally:
        os.close(fd)


def fs_use(path: StrPath) -> FsUse:
    """What the filesystem holding ``path`` uses, in constant time.

    ext4 counts blocks reserved for delayed allocation as used, so bytes
    written but not yet allocated are included.
    """
    st = os.statvfs(path)
    return FsUse(
        size=(st.f_blocks - st.f_bfree) * st.f_frsize,
        inodes=st.f_files - st.f_ffree,
    )
