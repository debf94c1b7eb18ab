"""ID-mapped mounts: applying mounts whose options carry ``uidmap=``/``gidmap=``.

containerd's mount code understands these options on ``bind`` and
``overlay`` mounts (a snapshotter with ``remap-ids`` returns them): each
source layer is cloned with ``open_tree``, the clone gets the mapping with
``mount_setattr(MOUNT_ATTR_IDMAP)``, and the overlay is mounted on the
clones. Files then show their owners shifted by the mapping, without a
single chown. This module does the same for our own mount helper and tests.

A mapping is carried by a user namespace; one is made for the purpose by a
helper process that unshares, gets its maps written by us, and exits once
its namespace fd is open.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from ..types import Mount
from . import mountopts as mo
from ._libc import StrPath, fsencode, os_error, syscall
from .helper_process import Helper
from .mount import apply_mounts, unmount

__all__ = ["apply_idmapped_mounts", "has_idmap", "user_namespace"]

CLONE_NEWUSER = 0x10000000
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000


def has_idmap(m: Mount) -> bool:
    """Whether ``m`` asks for an id-mapped mount."""
    return any(o.startswith(("uidmap=", "gidmap=")) for o in m.options)


def _map_text(value: str) -> str:
    # "0:1000:65536,..." (containerd's labels and options) -> uid_map lines.
    return "".join(" ".join(r.split(":")) + "\n" for r in value.split(",") if r)


# The helper unshares, reports, and holds the namespace until its stdin closes.
_UNSHARE_SCRIPT = """
report(libc.unshare(int(sys.argv[1])))
sys.stdin.read()
"""


@contextmanager
def user_namespace(uidmap: str, gidmap: str) -> Iterator[int]:
    """An fd of a new user namespace with these maps (``ctr:host:size[,...]``).

    The namespace is made by a helper in a fresh interpreter
    (:mod:`.helper_process`): ``unshare(CLONE_NEWUSER)`` needs a
    single-threaded process, which a fork of this one is not once gRPC (or
    any library with fork handlers) has started threads. A failure carries
    the helper's own errno.
    """
    with Helper(_UNSHARE_SCRIPT, [str(CLONE_NEWUSER)]) as helper:
        helper.expect_ok("unshare(CLONE_NEWUSER)")
        Path(f"/proc/{helper.pid}/uid_map").write_text(_map_text(uidmap))
        Path(f"/proc/{helper.pid}/gid_map").write_text(_map_text(gidmap))
        fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _idmapped_clone(source: StrPath, userns: int, readonly: bool, recursive: bool) -> int:
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = syscall("open_tree", AT_FDCWD, fsencode(source), flags, path=source)
    try:
        attr_set = MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if readonly else 0)
        attr = struct.pack("=4Q", attr_set, 0, 0, userns)  # struct mount_attr
        at = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
        syscall("mount_setattr", fd, b"", at, attr, len(attr), path=source)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _attach(fd: int, target: StrPath) -> None:
    try:
        syscall(
            "move_mount", fd, b"", AT_FDCWD, fsencode(target), MOVE_MOUNT_F_EMPTY_PATH, path=target
        )
    finally:
        os.close(fd)


def _split(options: Sequence[str]) -> tuple[str, str, list[str]]:
    uidmap = gidmap = ""
    rest: list[str] = []
    for o in options:
        if o.startswith("uidmap="):
            uidmap = o[len("uidmap=") :]
        elif o.startswith("gidmap="):
            gidmap = o[len("gidmap=") :]
        else:
            rest.append(o)
    return uidmap, gidmap, rest


def _apply_one(m: Mount, target: Path, scratch: Path) -> None:
    uidmap, gidmap, rest = _split(m.options)
    with user_namespace(uidmap or gidmap, gidmap or uidmap) as userns:
        if m.type in ("bind", "rbind"):
            opts = mo.parse_options(rest)
            recursive = m.type == "rbind" or bool(opts.flags & mo.MS_REC)
            readonly = bool(opts.flags & mo.MS_RDONLY)
            _attach(_idmapped_clone(m.source, userns, readonly, recursive), target)
            return
        # overlay: idmap every lower layer; the upper (chowned to the mapped
        # root by the snapshotter) is used as it is, as containerd does.
        lower_opt = next((o for o in rest if o.startswith("lowerdir=")), None)
        if m.type != "overlay" or lower_opt is None:
            raise os_error(22, target, f"uidmap/gidmap on a {m.type} mount")  # EINVAL
        lowers = [mo.unescape(p) for p in mo.split_escaped(lower_opt[len("lowerdir=") :], ":")]
        layers: list[Path] = []
        try:
            for i, lower in enumerate(lowers):
                d = scratch / str(i)
                d.mkdir()
                _attach(_idmapped_clone(lower, userns, readonly=True, recursive=False), d)
                layers.append(d)
            mapped = "lowerdir=" + ":".join(str(d) for d in layers)
            options = tuple(mapped if o is lower_opt else o for o in rest)
            apply_mounts([Mount(m.type, m.source, options, m.target)], target)
        finally:
            # overlayfs holds private clones of its layers: ours can go now.
            for d in reversed(layers):
                with suppress(OSError):
                    unmount(d, lazy=True)


def apply_idmapped_mounts(mounts: Sequence[Mount], target: StrPath) -> None:
    """:func:`~.mount.apply_mounts`, plus ``uidmap=``/``gidmap=`` on bind and overlay mounts.

    Only root mounts (empty ``Mount.target``) may carry a mapping here.
    """
    plain = [m for m in mounts if not has_idmap(m)]
    if len(plain) == len(mounts):
        apply_mounts(mounts, target)
        return
    if len(mounts) != 1 or mounts[0].target:
        raise os_error(22, target, "id-mapped mounts: one root mount only")  # EINVAL
    scratch = Path(tempfile.mkdtemp(prefix=".idmap-", dir=Path(target).parent))
    try:
        _apply_one(mounts[0], Path(target), scratch)
    finally:
        for d in scratch.iterdir():
            with suppress(OSError):
                d.rmdir()
        with suppress(OSError):
            scratch.rmdir()
