"""Mount option words → ``mount(2)`` flags plus the filesystem's data string.

Words the kernel takes as flags (``ro``, ``nosuid``, ``rbind``, ...) become
``MS_*`` bits, applied in order so that a later ``rw`` undoes an earlier
``ro`` (as ``mount(8)`` does); propagation words need their own
``mount(2)`` call and are kept apart; ``loop`` is a request to the caller;
everything else is passed to the filesystem verbatim.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MS_BIND",
    "MS_DIRSYNC",
    "MS_LAZYTIME",
    "MS_MANDLOCK",
    "MS_MOVE",
    "MS_NOATIME",
    "MS_NODEV",
    "MS_NODIRATIME",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_NOSYMFOLLOW",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_RELATIME",
    "MS_REMOUNT",
    "MS_SHARED",
    "MS_SILENT",
    "MS_SLAVE",
    "MS_STRICTATIME",
    "MS_SYNCHRONOUS",
    "MS_UNBINDABLE",
    "MountOptions",
    "parse_options",
    "split_escaped",
    "unescape",
]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

_SET = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "sync": MS_SYNCHRONOUS,
    "remount": MS_REMOUNT,
    "mand": MS_MANDLOCK,
    "dirsync": MS_DIRSYNC,
    "nosymfollow": MS_NOSYMFOLLOW,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
    "lazytime": MS_LAZYTIME,
    "silent": MS_SILENT,
}
_CLEAR = {
    "rw": MS_RDONLY,
    "suid": MS_NOSUID,
    "dev": MS_NODEV,
    "exec": MS_NOEXEC,
    "async": MS_SYNCHRONOUS,
    "nomand": MS_MANDLOCK,
    "atime": MS_NOATIME,
    "diratime": MS_NODIRATIME,
    "norelatime": MS_RELATIME,
    "nostrictatime": MS_STRICTATIME,
    "nolazytime": MS_LAZYTIME,
    "loud": MS_SILENT,
    "defaults": 0,
}
_PROPAGATION = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}


@dataclass(frozen=True)
class MountOptions:
    """What a list of option words asks of ``mount(2)``."""

    flags: int = 0
    #: MS_SHARED/PRIVATE/SLAVE/UNBINDABLE (| MS_REC): a second mount(2) call.
    propagation: int = 0
    #: Options for the filesystem itself, in their original order.
    data: tuple[str, ...] = ()
    #: ``loop``: the source is an image file to attach to a loop device first.
    loop: bool = False

    @property
    def data_string(self) -> str:
        return ",".join(self.data)


def parse_options(options: Iterable[str]) -> MountOptions:
    """Split option words into flags, propagation, data and the ``loop`` request.

    ``x-``/``X-`` words (``X-containerd.*``, ``x-systemd.*``) are userspace
    conventions that the kernel would reject, so they are dropped here; the
    code that understands them reads them from the Mount itself.
    """
    flags = propagation = 0
    data: list[str] = []
    loop = False
    for word in options:
        if word in _SET:
            flags |= _SET[word]
        elif word in _CLEAR:
            flags &= ~_CLEAR[word]
        elif word in _PROPAGATION:
            propagation = _PROPAGATION[word]
        elif word == "loop":
            loop = True
        elif word[:2] in ("x-", "X-") or not word:
            continue
        else:
            data.append(word)
    return MountOptions(flags, propagation, tuple(data), loop)


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped by a backslash; escapes are kept.

    Overlayfs escapes ``,`` and ``:`` inside paths with ``\\``, so a data
    string is split on unescaped commas and a ``lowerdir`` on unescaped
    colons; the backslashes stay for the kernel (or :func:`unescape`).
    """
    parts: list[str] = []
    start = i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == sep:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def unescape(text: str) -> str:
    """Drop overlayfs' backslash escapes (``\\:`` → ``:``, ``\\\\`` → ``\\``)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)
