"""Hostile layer tars (path traversal, symlink and hard-link escapes, huge headers), as
bytes; each must be refused by any layer applier (no pytest: shared by tests)."""

from __future__ import annotations

import tarfile
from collections.abc import Callable

from .oci import Layer

__all__ = ["HOSTILE", "entry"]


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    """A bare tar header (for names no well-behaved writer makes)."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = kind, link, 0o644
    return ti


def _huge_pax() -> bytes:
    """A tar whose first header announces a 64 MiB PAX extended header."""
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type, hdr.size = tarfile.XHDTYPE, 64 << 20
    return hdr.tobuf(format=tarfile.USTAR_FORMAT) + b"x" * 4096


HOSTILE: dict[str, Callable[[], bytes]] = {
    "dotdot": lambda: Layer().raw(entry("../escaped"), b"x").tar(),
    "dotdot-inside": lambda: Layer().dir("a").raw(entry("a/../../escaped"), b"x").tar(),
    "symlink-parent-absolute": lambda: (
        Layer().symlink("evil", "/tmp").raw(entry("evil/escaped"), b"x").tar()
    ),
    "symlink-parent-dotdot": lambda: (
        Layer().symlink("evil", "../../..").raw(entry("evil/escaped"), b"x").tar()
    ),
    "symlink-chain": lambda: (
        Layer()
        .dir("d")
        .symlink("d/up", "..")
        .symlink("lnk", "d/up/..")
        .raw(entry("lnk/escaped"), b"x")
        .tar()
    ),
    "hardlink-outside": lambda: Layer().raw(entry("h", tarfile.LNKTYPE, "../../etc/passwd")).tar(),
    # Scoped to the layer root (as every name is), where no etc/passwd exists.
    "hardlink-absolute": lambda: Layer().raw(entry("h", tarfile.LNKTYPE, "/etc/passwd")).tar(),
    "hardlink-through-symlink": lambda: (
        Layer().symlink("evil", "/etc").raw(entry("h", tarfile.LNKTYPE, "evil/passwd")).tar()
    ),
    "huge-header": _huge_pax,
}
