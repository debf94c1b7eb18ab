"""Disk usage of a tree, and the syncs a flush of it is made of (see :mod:`.flush`).

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
from dataclasses import dataclass

from ..types import Usage
from ._libc import StrPath, check, libc

__all__ = ["Tree", "disk_usage", "fsync_path", "syncfs", "walk_tree"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_syncfs = libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int


def disk_usage(path: StrPath) -> Usage:
    """Allocated bytes and distinct inodes of the tree at ``path``.

    Every inode counts once: hard links are recognised by ``(st_dev,
    st_ino)``, and so is a directory seen twice (a bind mount of part of the
    tree), whose contents are then not walked again. A file or symlink at
    ``path`` counts on its own. Entries that disappear during the walk (an
    active snapshot in use) are skipped.
    """
    return _walk(os.fspath(path), None).usage


@dataclass(frozen=True)
class Tree:
    """A tree as one walk saw it: its usage, and what a flush of it must sync."""

    usage: Usage
    #: Regular files, each inode once; None when the walk gave up listing
    #: (more files and directories than its limit).
    files: list[str] | None
    #: Directories, deepest first (a directory is listed after its parent is walked).
    dirs: list[str]
    #: Whether every entry is on the filesystem of the root (no mount below it).
    one_device: bool


def _walk(root: str, list_limit: int | None) -> Tree:
    """:func:`disk_usage` of ``root`` and, given ``list_limit``, its files and directories.

    The lists stop (``files`` None) beyond ``list_limit`` files and
    directories together, or when no limit was given.
    """
    st = os.lstat(root)
    size, inodes = st.st_blocks * 512, 1
    files: list[str] | None = [] if list_limit is not None else None
    dirs: list[str] = []
    one_device = True
    if not stat.S_ISDIR(st.st_mode):
        if files is not None and stat.S_ISREG(st.st_mode):
            files.append(root)
        return Tree(Usage(size=size, inodes=inodes), files, dirs, one_device)
    # Only directories and multiply-linked inodes can be met twice, so only
    # they go into the set: it stays small on trees of millions of files.
    seen = {(st.st_dev, st.st_ino)}
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
                    if est.st_dev != st.st_dev:
                        one_device = False
                    # Only regular files: opening a FIFO or a device could block.
                    if files is not None and stat.S_ISREG(est.st_mode):
                        files.append(f"{directory}/{entry.name}")
                    size += est.st_blocks * 512
                    inodes += 1
        finally:
            os.close(fd)
        if files is not None and list_limit is not None and len(files) + len(dirs) > list_limit:
            files = None
    # A directory is always walked after its parent: reversed, deepest first.
    dirs.reverse()
    return Tree(Usage(size=size, inodes=inodes), files, dirs, one_device)


def walk_tree(path: StrPath, list_limit: int) -> Tree:
    """One walk of ``path``: its :func:`disk_usage`, and its entries up to ``list_limit``."""
    return _walk(os.fspath(path), list_limit)


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
