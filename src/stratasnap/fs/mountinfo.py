"""``/proc/self/mountinfo``: the mount table as the kernel sees it.

mountinfo rather than ``/proc/self/mounts`` because it is the only one that
also shows a mount's root inside its filesystem (needed to tell bind mounts
apart) and its parent, and it escapes paths the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MountInfo",
    "escape_field",
    "mountpoints_below",
    "parse_mountinfo",
    "read_mountinfo",
    "read_mountinfo_bytes",
    "unescape_field",
]

_MOUNTINFO = Path("/proc/self/mountinfo")
_OCTAL = re.compile(rb"\\([0-7]{3})")
#: What the kernel escapes in mountinfo paths (seq_path's " \t\n\\").
_ESCAPED = re.compile(rb"[ \t\n\\]")


@dataclass(frozen=True)
class MountInfo:
    """One line of mountinfo (the fields this package uses)."""

    mount_id: int
    parent_id: int
    #: The directory of the filesystem that is mounted (``/`` unless a bind).
    root: str
    mountpoint: Path
    options: str
    fstype: str
    source: str
    super_options: str


def unescape_field(field: bytes) -> str:
    """Undo the kernel's octal escapes (``\\040`` space, ``\\011`` tab, ...).

    Paths are bytes to the kernel, so the result is decoded like ``os``
    decodes names (undecodable bytes survive as surrogates).
    """
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def escape_field(path: str) -> bytes:
    """A path as mountinfo spells it (the inverse of :func:`unescape_field`)."""
    return _ESCAPED.sub(lambda m: b"\\%03o" % m.group()[0], os.fsencode(path))


def mountpoints_below(text: bytes, root: str) -> list[tuple[int, Path]]:
    """(line index, mount point) of mountinfo ``text``'s mounts at or below ``root``.

    ``root`` is a resolved absolute path. Every such mount point's field starts
    with ``root`` as the kernel escapes it, so text without that byte string
    has none: the common case (nothing mounted in a snapshot being deleted)
    costs one substring search instead of parsing every line, which the
    reaper would otherwise pay twice per removed snapshot, however many
    mounts the host has.
    """
    if escape_field(root) not in text:
        return []
    prefix = root.rstrip("/") + "/"
    return [
        (i, m.mountpoint)
        for i, m in enumerate(parse_mountinfo(text))
        if str(m.mountpoint) == root or str(m.mountpoint).startswith(prefix)
    ]


def parse_mountinfo(text: bytes) -> list[MountInfo]:
    """Parse mountinfo contents; lines keep the kernel's order (parents first)."""
    result: list[MountInfo] = []
    for line in text.splitlines():
        fields = line.split(b" ")
        if len(fields) < 10:
            continue
        # Optional fields (shared:N, master:N, ...) end at a lone "-".
        try:
            sep = fields.index(b"-", 6)
        except ValueError:
            continue
        result.append(
            MountInfo(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                root=unescape_field(fields[3]),
                mountpoint=Path(unescape_field(fields[4])),
                options=fields[5].decode(),
                fstype=unescape_field(fields[sep + 1]),
                source=unescape_field(fields[sep + 2]),
                super_options=unescape_field(fields[sep + 3]) if len(fields) > sep + 3 else "",
            )
        )
    return result


def read_mountinfo_bytes() -> bytes:
    """The calling process's mount table, as the kernel wrote it."""
    return _MOUNTINFO.read_bytes()


def read_mountinfo() -> list[MountInfo]:
    """The calling process's mount table."""
    return parse_mountinfo(read_mountinfo_bytes())
