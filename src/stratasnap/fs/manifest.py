"""A comparable description of a tree: what a faithful copy must reproduce.

For tests (of the copier, of backends, of layer appliers): two trees are the
same when their manifests are equal. Access times and ctimes are left out,
since reading a tree changes the one and copying it always changes the other.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

from ._libc import StrPath

__all__ = ["Entry", "manifest"]


@dataclass(frozen=True)
class Entry:
    """One path of a tree, relative to its root (the root itself is ``"."``)."""

    kind: str  # "dir", "file", "symlink", "chr", "blk", "fifo", "sock"
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    sha256: str = ""
    target: str = ""  # symlinks
    rdev: tuple[int, int] = (0, 0)  # device nodes
    xattrs: tuple[tuple[str, bytes], ...] = ()
    #: For hard-linked inodes: the first path (in sorted order) of the inode.
    link_group: str = ""


_KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def manifest(root: StrPath, content: bool = True) -> dict[str, Entry]:
    """Describe every path under ``root`` (hashing file contents when ``content``)."""
    top = os.fspath(root)
    paths = ["."]
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for name in dirnames + filenames:
            paths.append(os.path.normpath(os.path.join(rel, name)))
    paths.sort()
    first: dict[tuple[int, int], str] = {}
    result: dict[str, Entry] = {}
    for rel in paths:
        full = os.path.join(top, rel)
        st = os.lstat(full)
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        group = ""
        if kind != "dir" and st.st_nlink > 1:
            group = first.setdefault((st.st_dev, st.st_ino), rel)
        result[rel] = Entry(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            size=st.st_size if kind in ("file", "symlink") else 0,
            sha256=_sha256(full) if content and kind == "file" else "",
            target=os.readlink(full) if kind == "symlink" else "",
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else (0, 0),
            xattrs=_xattrs(full),
            link_group=group,
        )
    return result
