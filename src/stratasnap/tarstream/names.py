"""Member names as path components: the one rule every layer reader applies."""

from __future__ import annotations

from .errors import UnsafeEntry

__all__ = ["NAME_MAX", "split_name"]

NAME_MAX = 255  # bytes in one path component (Linux, and EROFS dirents)


def split_name(name: bytes, offset: int) -> tuple[bytes, ...]:
    """A member name (or hard-link target) as path components below the layer root.

    The one rule for names, for every reader of layers (the images applier and
    the EROFS converter alike), so that a layer lands the same on every backend:

    * An absolute name is relative to the layer root: ``/etc/x`` is ``etc/x``.
      containerd's applier (archive/tar.go, ``applyNaive``) cleans each name
      and resolves it with ``fs.RootPath(root, name)``, which scopes it to the
      root, and resolves hard-link targets the same way; docker's pkg/archive
      joins the cleaned name under its destination. Image builders (old
      docker, tar -P) do emit such names, so refusing them would refuse
      images containerd runs.
    * ``.`` components and repeated ``/`` are dropped, as a clean does.
    * ``..`` is refused rather than clamped (containerd clamps it at the root,
      docker refuses a name that climbs out): a layer that needs it is hostile
      or broken. NUL bytes and components over NAME_MAX are refused too.
    """
    if b"\0" in name:
        raise UnsafeEntry(f"name {name!r} contains NUL", offset=offset)
    parts = tuple(p for p in name.split(b"/") if p and p != b".")
    if b".." in parts:
        raise UnsafeEntry(f"name {name!r} climbs out with '..'", offset=offset)
    if parts and max(map(len, parts)) > NAME_MAX:
        raise UnsafeEntry(f"name component longer than {NAME_MAX} bytes", offset=offset)
    return parts
