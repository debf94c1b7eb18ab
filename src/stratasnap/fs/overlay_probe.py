"""What the kernel and a filesystem offer overlayfs: d_type, user namespaces, index, idmaps.

These are the checks containerd's overlayfs snapshotter makes when it
starts (``overlayutils``), done here from Python without subprocesses.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import tempfile
import threading
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


#: Probe results by the st_dev of the filesystem they were made on.
_IDMAP_PROBED: dict[int, bool] = {}
_IDMAP_LOCK = threading.Lock()
#: The probe's mapping: container root is host uid/gid 1000 (any shift would do).
_PROBE_SHIFT = 1000
_PROBE_PREFIX = ".idmap-probe-"


def idmapped_layers_supported(directory: StrPath | None = None) -> bool:
    """Whether overlayfs takes idmapped lower layers from the filesystem of ``directory``.

    That is what containerd's mount code needs to apply ``uidmap=`` and
    ``gidmap=`` options to an overlay (overlayfs since Linux 5.19; the lower
    filesystem must allow idmapped mounts too: ext4, xfs, btrfs since 5.12-5.15,
    tmpfs since 6.3). Asked of the kernel by mounting: in a scratch directory
    under ``directory`` (default: the temp dir), an overlay of two idmapped
    lowers, whose file must show the mapped owner. Once per filesystem and
    process (cached). Where the probe cannot run (not root, no room for its
    directories) the kernel version decides, as before.
    """
    where = os.fspath(directory) if directory is not None else tempfile.gettempdir()
    try:
        dev = os.stat(where).st_dev
    except OSError:
        return _release_at_least(5, 19)
    with _IDMAP_LOCK:
        if dev not in _IDMAP_PROBED:
            probed = _probe_idmapped_overlay(where)
            if probed is None:
                return _release_at_least(5, 19)  # not cached: a later call may probe
            _IDMAP_PROBED[dev] = probed
        return _IDMAP_PROBED[dev]


def _probe_idmapped_overlay(directory: str) -> bool | None:
    """True or False from a real mount; None when this process cannot try."""
    from ..types import Mount
    from .idmapped import apply_idmapped_mounts
    from .mount import unmount

    if os.geteuid() != 0:
        return None  # mounting needs CAP_SYS_ADMIN in the initial namespace
    _sweep_probes(directory)
    try:
        scratch = tempfile.mkdtemp(prefix=_PROBE_PREFIX, dir=directory)
        lock = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None  # a full or read-only filesystem: nothing to learn here
    fcntl.flock(lock, fcntl.LOCK_EX)  # held while probing: _sweep_probes skips it
    lower1, lower2, target = (os.path.join(scratch, n) for n in ("l1", "l2", "mnt"))
    try:
        for d in (lower1, lower2, target):
            os.mkdir(d)
        with open(os.path.join(lower1, "f"), "w"):
            pass  # owned by root: shown as _PROBE_SHIFT through the mapping
        mapping = f"0:{_PROBE_SHIFT}:1"
        options = (f"lowerdir={lower1}:{lower2}", f"uidmap={mapping}", f"gidmap={mapping}")
        try:
            apply_idmapped_mounts([Mount("overlay", "overlay", options)], target)
        except OSError:
            return False  # EINVAL: overlayfs (or the filesystem) refuses idmapped layers
        try:
            st = os.stat(os.path.join(target, "f"))
            return (st.st_uid, st.st_gid) == (_PROBE_SHIFT, _PROBE_SHIFT)
        finally:
            unmount(target, lazy=True)
    except OSError:
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(lock)


def _sweep_probes(directory: str) -> None:
    """Remove what probes killed midway left in ``directory`` (a mount, directories).

    A probe holds a flock on its directory: one that can be locked is a leftover.
    """
    from .mount import unmount_all_under

    with os.scandir(directory) as entries:
        stale = [e.path for e in entries if e.name.startswith(_PROBE_PREFIX) and e.is_dir()]
    for path in stale:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live probe (another thread or process)
        finally:
            os.close(fd)
        unmount_all_under(path, lazy=True)
        shutil.rmtree(path, ignore_errors=True)


def escape_layer_path(path: StrPath) -> str:
    """A path as one element of an overlay option: ``\\``, ``:`` and ``,`` escaped."""
    text = os.fspath(path)
    for ch in ("\\", ":", ","):
        text = text.replace(ch, "\\" + ch)
    return text
