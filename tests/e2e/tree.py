"""A filesystem tree as comparable data: names, types, modes, owners, sizes, contents,
link targets, device numbers, xattrs (no pytest: benchmarks use it too)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

__all__ = ["listing"]


def _xattrs(path: str) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    for n in names:
        if n.startswith(("security.selinux",)):
            continue
        out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


# A tree's listing: relative path -> that entry's properties.
Listing = dict[str, dict[str, Any]]


def listing(root: str | Path, mtimes: bool = True) -> Listing:
    """Every entry below ``root`` (relative path -> its properties); hard links share ``inode``."""
    root = str(root)
    out: dict[str, dict[str, Any]] = {}
    inodes: dict[tuple[int, int], int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "xattrs": _xattrs(path),
            }
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                entry["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                entry["inode"] = (st.st_dev, st.st_ino)
                inodes[entry["inode"]] = inodes.get(entry["inode"], 0) + 1
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
                del entry["mode"]
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if mtimes and not stat.S_ISDIR(st.st_mode):
                entry["mtime"] = int(st.st_mtime)
            out[rel] = entry
    # Hard links seen inside this tree (not st_nlink: an overlay lower keeps links the
    # merged view no longer shows): every member of a group names its first path.
    groups: dict[tuple[int, int], str] = {}
    for rel in sorted(out):
        ino = out[rel].pop("inode", None)
        if ino is not None:
            out[rel]["links_to"] = groups.setdefault(ino, rel) if inodes[ino] > 1 else ""
    return out
