"""What the kernel and a filesystem offer overlayfs: d_type, user namespaces, index, idmaps.

These are the checks containerd's overlayfs snapshotter makes when it
starts (``overlayutils``), done here from Python without subprocesses.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from functools import cache
from pathlib import Path

from ._libc import StrPath, fsencode, libc, os_error

__all__ = [
    "escape_layer_path",
    "idmapped_layers_supported",
    "in_user_namespace",
    "supports_d_type",
    "supports_index_option",
]

DT_UNKNOWN = 0
_OVERLAY_PARAMS = Path("/sys/module/overlay/parameters")


class _Dirent(ctypes.Structure):
    # struct dirent of glibc and musl on 64-bit Linux (same as dirent64).
    _fields_ = (
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    )


_opendir = libc.opendir
_opendir.argtypes = [ctypes.c_char_p]
_opendir.restype = ctypes.c_void_p
_readdir = libc.readdir
_readdir.argtypes = [ctypes.c_void_p]
_readdir.restype = ctypes.POINTER(_Dirent)
_closedir = libc.closedir
_closedir.argtypes = [ctypes.c_void_p]
_closedir.restype = ctypes.c_int


def _d_types(directory: StrPath) -> dict[str, int]:
    """Entry name -> d_type as readdir(3) reports it (``os.scandir`` hides it)."""
    handle = _opendir(fsencode(directory))
    if not handle:
        raise os_error(ctypes.get_errno(), directory, "opendir")
    try:
        found: dict[str, int] = {}
        while True:
            ent = _readdir(handle)
            if not ent:
                return found
            found[os.fsdecode(ent.contents.d_name)] = ent.contents.d_type
    finally:
        _closedir(handle)


def supports_d_type(directory: StrPath) -> bool:
    """Whether the filesystem holding ``directory`` fills in readdir's d_type.

    Overlayfs needs it to see whiteouts without a stat per entry and refuses
    (or misbehaves on) filesystems without it, e.g. xfs made with
    ``ftype=0`` or ext4 without the ``filetype`` feature.

    The entries already in ``directory`` answer when there are any (a
    snapshotter root always has some), so the check writes nothing: it
    must work on a filesystem that is full. Only an empty directory gets
    a probe file.
    """
    found = {n: t for n, t in _d_types(directory).items() if n not in (".", "..")}
    if found:
        return any(t != DT_UNKNOWN for t in found.values())
    probe = tempfile.mkdtemp(prefix="d_type-check-", dir=directory)
    try:
        os.close(os.open(os.path.join(probe, "f"), os.O_CREAT | os.O_WRONLY, 0o600))
        return _d_types(probe).get("f", DT_UNKNOWN) != DT_UNKNOWN
    finally:
        os.unlink(os.path.join(probe, "f"))
        os.rmdir(probe)


def _is_initial_map(text: str) -> bool:
    # The initial user namespace maps the whole 32-bit range onto itself.
    return text.split() == ["0", "0", "4294967295"]


@cache
def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the initial one.

    There ``trusted.*`` xattrs cannot be set, so overlayfs must be told
    ``userxattr`` to keep whiteout and opaque marks in ``user.overlay.*``.
    """
    try:
        text = Path("/proc/self/uid_map").read_text()
    except FileNotFoundError:  # a kernel without user namespaces
        return False
    return not _is_initial_map(text)


def supports_index_option() -> bool:
    """Whether overlayfs knows the ``index`` option (and may default it to on).

    containerd turns it off: with index=on a layer's upper records the
    identity of its lowers, and layers are remounted on other stacks.
    """
    return (_OVERLAY_PARAMS / "index").exists()


def _release_at_least(major: int, minor: int) -> bool:
    parts = os.uname().release.split(".")
    try:
        return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()))) >= (major, minor)
    except (IndexError, ValueError):
        return False


@cache
def idmapped_layers_supported() -> bool:
    """Whether overlayfs accepts idmapped lower layers (Linux 5.19 and later).

    That is what containerd's mount code needs to apply ``uidmap=`` and
    ``gidmap=`` options to an overlay; binds take idmaps since 5.12.
    """
    return _release_at_least(5, 19)


def escape_layer_path(path: StrPath) -> str:
    """A path as one element of an overlay option: ``\\``, ``:`` and ``,`` escaped."""
    text = os.fspath(path)
    for ch in ("\\", ":", ","):
        text = text.replace(ch, "\\" + ch)
    return text
