"""Mounting through the new mount API (fsopen → fsconfig → fsmount → move_mount).

Used for mounts whose data string does not fit in the single page that
``mount(2)`` copies: the kernel cuts it at 4096 bytes without a word and the
mount then fails with a misleading ENOENT on a truncated path (or, worse,
succeeds with fewer layers). With ``fsconfig`` every option is its own call,
and overlayfs (kernel ≥ 6.8) takes one ``lowerdir+`` per layer, up to 500.

``fsconfig`` copies at most 256 bytes of a string value, so a layer path
longer than 255 bytes is passed as an ``O_PATH`` file descriptor instead.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from functools import cache

from . import mountopts as mo
from ._libc import StrPath, fsencode, os_error, syscall

__all__ = ["mount_fs", "overlay_lowerdir_plus"]

FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1
MOVE_MOUNT_F_EMPTY_PATH = 4
AT_FDCWD = -100

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

_VALUE_MAX = 255

# Per-mount flags of mount(2) become attributes of the new mount...
_ATTRS = {
    mo.MS_RDONLY: MOUNT_ATTR_RDONLY,
    mo.MS_NOSUID: MOUNT_ATTR_NOSUID,
    mo.MS_NODEV: MOUNT_ATTR_NODEV,
    mo.MS_NOEXEC: MOUNT_ATTR_NOEXEC,
    mo.MS_NOATIME: MOUNT_ATTR_NOATIME,
    mo.MS_STRICTATIME: MOUNT_ATTR_STRICTATIME,
    mo.MS_NODIRATIME: MOUNT_ATTR_NODIRATIME,
    mo.MS_NOSYMFOLLOW: MOUNT_ATTR_NOSYMFOLLOW,
}
# ...and superblock flags become fsconfig flags (ro is both, as with mount(2)).
_SB_FLAGS = {
    mo.MS_RDONLY: "ro",
    mo.MS_SYNCHRONOUS: "sync",
    mo.MS_DIRSYNC: "dirsync",
    mo.MS_LAZYTIME: "lazytime",
    mo.MS_MANDLOCK: "mand",
}
# Overlay layers that may be given as a file descriptor when the path is long.
_FD_KEYS = {"upperdir", "workdir"}


class _Context:
    """An fsopen() filesystem context; its fd also carries the kernel's error text."""

    def __init__(self, fstype: str, target: StrPath) -> None:
        self.target = target
        self.fd = syscall("fsopen", fsencode(fstype), FSOPEN_CLOEXEC, path=target)

    def close(self) -> None:
        os.close(self.fd)

    def log(self) -> str:
        """What the filesystem said (e.g. "overlay: too many lower directories")."""
        lines: list[str] = []
        while True:
            try:
                msg = os.read(self.fd, 4096)
            except OSError:  # ENODATA: no more messages
                break
            if not msg:
                break
            line = msg.decode(errors="replace").strip()
            # Each message starts with its level: "e " error, "w " warning, "i " info.
            lines.append(line[2:] if line[1:2] == " " and line[:1] in "ewi" else line)
        return "; ".join(lines)

    def config(self, cmd: int, key: str | None, value: bytes | None = None, aux: int = 0) -> None:
        try:
            syscall(
                "fsconfig",
                self.fd,
                cmd,
                key.encode() if key is not None else None,
                value,
                aux,
                path=self.target,
            )
        except OSError as e:
            detail = f"fsconfig {key or 'create'}: {self.log() or e.strerror}"
            raise os_error(e.errno or errno.EINVAL, self.target, detail) from None

    def set(self, key: str, value: str | None) -> None:
        if value is None:
            self.config(FSCONFIG_SET_FLAG, key)
            return
        raw = fsencode(value)
        if len(raw) <= _VALUE_MAX:
            self.config(FSCONFIG_SET_STRING, key, raw)
        elif key in _FD_KEYS:
            self.set_path_fd(key, mo.unescape(value))
        else:
            raise os_error(errno.ENAMETOOLONG, self.target, f"option {key} is over 255 bytes")

    def set_path_fd(self, key: str, path: str) -> None:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # The kernel resolves the layer now and keeps its own reference.
            self.config(FSCONFIG_SET_FD, key, None, fd)
        finally:
            os.close(fd)

    def set_layer(self, key: str, path: str) -> None:
        # lowerdir+/datadir+ values are raw paths: overlayfs does not unescape them.
        if len(fsencode(path)) <= _VALUE_MAX:
            self.config(FSCONFIG_SET_STRING, key, fsencode(path))
        else:
            self.set_path_fd(key, path)


def _set_lowerdirs(ctx: _Context, value: str) -> None:
    # "a:b::c::d": a and b are layers, c and d data-only layers (after "::").
    key = "lowerdir+"
    for part in mo.split_escaped(value, ":"):
        if not part:
            key = "datadir+"
            continue
        ctx.set_layer(key, mo.unescape(part))


def mount_fs(fstype: str, source: str, target: StrPath, flags: int, options: Sequence[str]) -> None:
    """Mount a new ``fstype`` filesystem at ``target`` with each option set separately."""
    ctx = _Context(fstype, target)
    try:
        if source:
            ctx.set("source", source)
        for bit, name in _SB_FLAGS.items():
            if flags & bit:
                ctx.set(name, None)
        for opt in options:
            key, eq, value = opt.partition("=")
            if fstype == "overlay" and key == "lowerdir" and eq:
                _set_lowerdirs(ctx, value)
            else:
                ctx.set(key, value if eq else None)
        ctx.config(FSCONFIG_CMD_CREATE, None)
        attrs = 0
        for bit, attr in _ATTRS.items():
            if flags & bit:
                attrs |= attr
        mnt = syscall("fsmount", ctx.fd, FSMOUNT_CLOEXEC, attrs, path=target)
        try:
            syscall(
                "move_mount",
                mnt,
                b"",
                AT_FDCWD,
                fsencode(target),
                MOVE_MOUNT_F_EMPTY_PATH,
                path=target,
            )
        finally:
            os.close(mnt)
    finally:
        ctx.close()


@cache
def overlay_lowerdir_plus() -> bool:
    """Whether overlayfs takes ``lowerdir+`` through ``fsconfig`` (Linux 6.8 and later).

    Asked of the kernel, not read from its version (distributions backport):
    a filesystem context is opened and ``lowerdir+=/`` set, then dropped
    without mounting anything. An older overlayfs refuses the key (EINVAL);
    no new mount API (ENOSYS) or no privilege (EPERM) counts as no too.
    """
    try:
        fd = syscall("fsopen", b"overlay", FSOPEN_CLOEXEC)
    except OSError:
        return False
    try:
        syscall("fsconfig", fd, FSCONFIG_SET_STRING, b"lowerdir+", b"/", 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
