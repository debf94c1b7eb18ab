"""Member names as path components: the one rule every layer reader applies."""

from __future__ import annotations

from .errors import UnsafeEntry

__all__ = ["NAME_MAX", "split_name"]

NAME_MAX = 255  # bytes in one path component (Linux, and EROFS dirents)


def split_name(name: bytes, offset: int) -> tuple[bytes, ...]:
    """A member name (or hard-link target) as path components below the layer root.

    Per OCI layer rules the archive describes paths relative to the root: a
    leading ``/`` and ``.`` components are dropped (as containerd scopes them to
    the root); ``..`` is refused rather than clamped (a layer that needs it is
    hostile or broken), and so are NUL bytes and components over NAME_MAX.
    Whether an absolute name is acceptable at all is the caller's policy.
    """
    if b"\0" in name:
        raise UnsafeEntry(f"name {name!r} contains NUL", offset=offset)
    parts = tuple(p for p in name.split(b"/") if p and p != b".")
    if b".." in parts:
        raise UnsafeEntry(f"name {name!r} climbs out with '..'", offset=offset)
    if parts and max(map(len, parts)) > NAME_MAX:
        raise UnsafeEntry(f"name component longer than {NAME_MAX} bytes", offset=offset)
    return parts
