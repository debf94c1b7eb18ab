"""Extended attributes in EROFS: name prefixes, the shared area, per-inode bodies.

EROFS stores a name as a one-byte prefix index plus the rest of the name. An
(name, value) pair that two or more inodes carry is written once into the
shared xattr area and referenced by a 32-bit id (its offset in 4-byte units);
the rest are stored inline, in the body that follows each inode.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from . import format as fmt

__all__ = ["SharedXattrs", "XattrKey", "split_name"]

XattrKey = tuple[int, bytes, bytes]  # (prefix index, name suffix, value)

_PREFIXES = (
    (b"user.", fmt.XATTR_USER),
    (b"trusted.", fmt.XATTR_TRUSTED),
    (b"security.", fmt.XATTR_SECURITY),
)
_WHOLE_NAMES = {
    b"system.posix_acl_access": fmt.XATTR_POSIX_ACL_ACCESS,
    b"system.posix_acl_default": fmt.XATTR_POSIX_ACL_DEFAULT,
}
MAX_VALUE = 0xFFFF  # e_value_size is 16 bits (and Linux caps values at 64 KiB)


def split_name(name: bytes) -> tuple[int, bytes] | None:
    """(index, suffix) for a full xattr name; None when EROFS has no prefix for it."""
    whole = _WHOLE_NAMES.get(name)
    if whole is not None:
        return whole, b""
    for prefix, index in _PREFIXES:
        if name.startswith(prefix):
            suffix = name[len(prefix) :]
            if suffix and len(suffix) <= 0xFF:
                return index, suffix
            return None
    return None


def encodable(items: dict[bytes, bytes]) -> list[XattrKey]:
    """The storable xattrs of one inode, in a stable order."""
    out: list[XattrKey] = []
    for name, value in sorted(items.items()):
        split = split_name(name)
        if split is not None and len(value) <= MAX_VALUE:
            out.append((split[0], split[1], value))
    return out


class SharedXattrs:
    """Decides which pairs are shared and builds the shared area."""

    def __init__(self, per_inode: Iterable[list[XattrKey]]) -> None:
        counts = Counter(key for keys in per_inode for key in keys)
        self.ids: dict[XattrKey, int] = {}
        area = bytearray()
        for key, count in counts.items():
            if count < 2:
                continue
            self.ids[key] = len(area) // 4
            area += fmt.xattr_entry(*key)
        self.area = bytes(area)

    def ibody(self, keys: list[XattrKey]) -> bytes:
        """The xattr body of one inode (b"" when it has none)."""
        if not keys:
            return b""
        shared = [self.ids[k] for k in keys if k in self.ids][: fmt.XATTR_MAX_SHARED_PER_INODE]
        shared_set = set(shared)
        inline = b"".join(
            fmt.xattr_entry(*k) for k in keys if self.ids.get(k, -1) not in shared_set
        )
        body = (
            fmt.pack_xattr_ibody_header(len(shared))
            + b"".join(i.to_bytes(4, "little") for i in shared)
            + inline
        )
        return body
