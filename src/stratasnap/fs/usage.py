"""Disk usage of a tree, and flushing a tree to disk.

:func:`disk_usage` is containerd's ``fs.DiskUsage``: allocated bytes
(``st_blocks * 512``, what ``du -s -B1`` prints) and the number of distinct
inodes, directories and the root included. A scandir walk over directory
fds is within 1.5x of ``du`` itself and needs no subprocess
(python-baselines 4a). Mounts below the path are walked too, as containerd
does.
"""

from __future__ import annotations

import ctypes
import os
import stat

from ..types import Usage
from ._libc import StrPath, check, libc

__all__ = ["disk_usage", "flush_tree", "fsync_path", "syncfs"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_syncfs = libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int

# Above this many files and directories, one syncfs(2) instead of an fsync
# each. Each fsync on ext4 is a journal commit plus a device flush; syncfs is
# one of each, but it also writes back whatever *else* is dirty on the
# filesystem, an unbounded cost on a busy node; so a handful of entries get
# their own fsync. benchmarks/flush.py on a fresh ext4 loop (shared machine,
# medians of 5): four 64 KiB files, fsync each 34 ms, syncfs 11 ms; the same
# with 256 MiB of other data dirty on the filesystem, fsync each 19 ms, syncfs
# 274 ms (14x); ten 1 MiB files (containerd's benchsuite layer) fsync each 62
# ms, syncfs 22 ms; 30,000 files of 4 KiB, syncfs 0.9 s (an fsync each would
# take minutes). Starting writeback of every file first with
# sync_file_range(SYNC_FILE_RANGE_WRITE) and then fsyncing each gained little
# (0.82x-1.14x of plain fsyncs), so it is not used.
FSYNC_LIMIT = 8


def disk_usage(path: StrPath) -> Usage:
    """Allocated bytes and distinct inodes of the tree at ``path``.

    Every inode counts once: hard links are recognised by ``(st_dev,
    st_ino)``, and so is a directory seen twice (a bind mount of part of the
    tree), whose contents are then not walked again. A file or symlink at
    ``path`` counts on its own. Entries that disappear during the walk (an
    active snapshot in use) are skipped.
    """
    return _walk(os.fspath(path), None)[0]


def _walk(root: str, sync_limit: int | None) -> tuple[Usage, list[str] | None]:
    """:func:`disk_usage` of ``root`` and, given ``sync_limit``, what a flush must fsync.

    The list holds regular files, then directories deepest first, each inode
    once; it is None when there are more than ``sync_limit`` of them (or no
    limit was given): the whole filesystem is then synced instead.
    """
    st = os.lstat(root)
    size, inodes = st.st_blocks * 512, 1
    sync: list[str] | None = [] if sync_limit is not None else None
    if not stat.S_ISDIR(st.st_mode):
        if sync is not None and stat.S_ISREG(st.st_mode):
            sync.append(root)
        return Usage(size=size, inodes=inodes), sync
    # Only directories and multiply-linked inodes can be met twice, so only
    # they go into the set: it stays small on trees of millions of files.
    seen = {(st.st_dev, st.st_ino)}
    dirs: list[str] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            fd = os.open(directory, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            continue
        dirs.append(directory)
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        est = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    is_dir = stat.S_ISDIR(est.st_mode)
                    if is_dir or est.st_nlink > 1:
                        key = (est.st_dev, est.st_ino)
                        if key in seen:
                            continue
                        seen.add(key)
                        if is_dir:
                            stack.append(f"{directory}/{entry.name}")
                    # Only regular files: opening a FIFO or a device could block.
                    if sync is not None and stat.S_ISREG(est.st_mode):
                        sync.append(f"{directory}/{entry.name}")
                    size += est.st_blocks * 512
                    inodes += 1
        finally:
            os.close(fd)
        if sync is not None and sync_limit is not None and len(sync) + len(dirs) > sync_limit:
            sync = None
    if sync is not None:
        # A directory is always walked after its parent: reversed, deepest first.
        sync.extend(reversed(dirs))
    return Usage(size=size, inodes=inodes), sync


def syncfs(path: StrPath) -> None:
    """``syncfs(2)``: write back everything dirty on the filesystem holding ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        check(_syncfs(fd), path, "syncfs")
    finally:
        os.close(fd)


def fsync_path(path: StrPath) -> None:
    """fsync(2) of a file or directory by path (not through a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_tree(path: StrPath, fsync_limit: int = FSYNC_LIMIT) -> Usage:
    """Make the data and entries of the tree at ``path`` durable; return its :func:`disk_usage`.

    Used before committing an active snapshot, so that a crash right after
    the commit cannot leave a committed layer with lost writes
    (containerd#5854). One walk serves both the flush and the usage the
    commit stores. A tree of at most ``fsync_limit`` files and directories
    gets an fsync of each (files, then directories deepest first); a bigger
    one a single :func:`syncfs`.
    """
    root = os.fspath(path)
    usage, sync = _walk(root, fsync_limit)
    if sync is None:
        syncfs(root)
        return usage
    for p in sync:
        fsync_path(p)
    return usage
