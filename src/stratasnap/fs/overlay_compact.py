"""Overlay mounts with long lowerdir lists on kernels without ``lowerdir+`` (before 6.8).

``mount(2)`` takes one page of options. containerd's answer, which works on
any kernel: give the layers as paths relative to their common directory and
call ``mount(2)`` from a process whose working directory is that directory.
With the snapshot layout ``<root>/snapshots/<id>/fs`` each layer then costs
``<id>/fs:``, a few bytes, instead of the full path. The working directory
is process-wide, so the mount runs in a helper process (a fresh interpreter,
:mod:`.helper_process`: a fork of a threaded server may hang in the child).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from . import mountopts as mo
from ._libc import StrPath, fsencode, os_error
from .helper_process import Helper

__all__ = ["Compacted", "compact_lowerdirs", "mount_overlay_compact"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Compacted:
    """Overlay options with ``lowerdir`` relative to ``workdir`` (the common directory)."""

    workdir: str
    options: tuple[str, ...]

    @property
    def data(self) -> str:
        return ",".join(self.options)


def compact_lowerdirs(options: Sequence[str]) -> Compacted | None:
    """``options`` with the lowerdirs made relative to their common directory.

    As containerd does it: the longest common string prefix of the layer
    paths, cut back to a directory (the prefix may end inside a snapshot
    id). None when there is nothing to gain: one layer, relative paths, or
    nothing in common but ``/``. ``upperdir``/``workdir`` are left absolute.
    """
    idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if idx < 0:
        return None
    dirs = [mo.unescape(p) for p in mo.split_escaped(options[idx][len("lowerdir=") :], ":")]
    if len(dirs) < 2 or not all(d.startswith("/") and d for d in dirs):
        return None
    # A string prefix on purpose (it may end inside an id), cut back to a directory.
    common = os.path.dirname(os.path.commonprefix(dirs))  # noqa: RUF071
    if common in ("", "/"):
        return None
    prefix = common.rstrip("/") + "/"
    rel = [d[len(prefix) :] for d in dirs]
    if not all(rel):
        return None
    escaped = [r.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,") for r in rel]
    new = list(options)
    new[idx] = "lowerdir=" + ":".join(escaped)
    return Compacted(workdir=common, options=tuple(new))


# The helper runs in the layers' common directory (Popen's cwd), so the
# relative lowerdirs resolve there; arguments travel hex-encoded (any bytes).
_MOUNT_SCRIPT = """
target, data = (bytes.fromhex(a) for a in sys.argv[1:3])
report(libc.mount(b"overlay", target, b"overlay", ctypes.c_ulong(int(sys.argv[3])), data))
"""


def mount_overlay_compact(options: Sequence[str], target: StrPath, flags: int = 0) -> None:
    """Mount an overlay with ``mount(2)`` from the layers' common directory.

    Raises E2BIG when even the compacted options do not fit in a page,
    ETIMEDOUT when the helper hangs, and the mount's own error otherwise.
    """
    compacted = compact_lowerdirs(options)
    if compacted is None:
        raise os_error(errno.E2BIG, target, "overlay lowerdirs share no directory to compact")
    data = fsencode(compacted.data)
    if len(data) >= _PAGE:
        raise os_error(errno.E2BIG, target, "overlay options over a page even when compacted")
    target_abs = fsencode(os.path.abspath(target))
    args = [target_abs.hex(), data.hex(), str(flags)]
    with Helper(_MOUNT_SCRIPT, args, cwd=compacted.workdir) as helper:
        helper.expect_ok("mount -t overlay (compacted)", target)
