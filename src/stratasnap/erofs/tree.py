"""The image's file tree in memory: metadata only, file data is already on disk.

Tar members are applied in order, like an extraction would: a later member
replaces an earlier one of the same name (a directory over a directory only
updates its metadata), hard links share one :class:`Node`, and OCI whiteouts
become their overlayfs form. Link counts are not tracked while building: they
are counted from the final tree, so replaced or shadowed entries need no
bookkeeping.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from ..tarstream import UnsafeEntry

__all__ = ["NO_XATTRS", "OPAQUE_XATTR", "Node", "Tree"]

WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."  # aufs-internal names (.wh..wh.plnk, ...): never content
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"


class _NoXattrs(dict[bytes, bytes]):
    """The one shared, empty xattr dict of every non-directory without xattrs.

    Most inodes have none; one dict each would cost 64 bytes per inode. Only
    directories' xattrs are ever changed after creation (opaque markers,
    re-listing), and they always get a dict of their own; this one refuses.
    """

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("NO_XATTRS is shared: give the node a dict of its own")

    __setitem__ = update = setdefault = __delitem__ = pop = popitem = clear = _refuse  # type: ignore[assignment]


NO_XATTRS: dict[bytes, bytes] = _NoXattrs()


@dataclass(slots=True, eq=False)
class Node:
    """One inode. ``children`` is set for directories only (name -> node)."""

    mode: int  # S_IFxxx | permission bits
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    xattrs: dict[bytes, bytes]
    size: int = 0  # regular files: data length
    # regular files: the inode's i_u: the first block of the data (plain), or the
    # number of blocks the data takes (compressed: zindex is set)
    blkaddr: int = 0
    rdev: int = 0  # devices: encoded device number
    target: bytes = b""  # symlinks
    children: dict[bytes, Node] | None = None
    zindex: bytes | None = None  # compressed regular files: the full lcluster index
    implicit: bool = False  # a parent directory no member has listed (yet)
    whiteout: bool = False  # the 0/0 device a .wh. member of this layer made
    # Filled in by the layout (a tree is laid out once): kept here rather than in
    # per-inode dicts, which would cost more memory than the nodes themselves.
    nlink: int = 0
    nid: int = 0
    parent: Node | None = None  # directories only

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class Tree:
    """The directory tree being built; ``root`` is the image's root directory."""

    def __init__(self, default_mtime: int | None) -> None:
        self._default_mtime = default_mtime
        self._implicit: list[Node] = []
        self.newest = (0, 0)  # the newest mtime of any member placed
        self.root = self._implicit_dir()
        # Layers list a directory's members together: remember the last parent.
        self._last: tuple[tuple[bytes, ...], Node] = ((), self.root)

    def _implicit_dir(self) -> Node:
        # Parents a layer never lists get what containerd's applier would give them
        # (root-owned 0755). Their time is not "now" (images stay reproducible) but
        # the caller's default, else the newest time in the layer (see finish()).
        node = Node(stat.S_IFDIR | 0o755, 0, 0, self._default_mtime or 0, 0, {}, children={})
        node.implicit = True
        self._implicit.append(node)
        return node

    def finish(self) -> None:
        """Give unlisted parent directories their time, once every member is known."""
        if self._default_mtime is None:
            for node in self._implicit:
                if node.implicit:
                    node.mtime, node.mtime_nsec = self.newest
        self._implicit.clear()

    def _relist(self, old: Node, node: Node) -> None:
        """A directory listed again (or for the first time): its metadata, its contents kept."""
        old.mode, old.uid, old.gid = node.mode, node.uid, node.gid
        old.mtime, old.mtime_nsec = node.mtime, node.mtime_nsec
        old.xattrs.update(node.xattrs)
        old.implicit = False

    def directory(self, parts: tuple[bytes, ...], offset: int) -> Node:
        """The directory at ``parts``, creating missing ones on the way."""
        if self._last[0] == parts:
            return self._last[1]
        node = self.root
        for part in parts:
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = self._implicit_dir()
            elif child.whiteout:
                # Whited out below, recreated by this layer: nothing from below may
                # show through, so the new directory is opaque.
                child = node.children[part] = self._implicit_dir()
                child.xattrs[OPAQUE_XATTR] = b"y"
            elif not child.is_dir:
                raise UnsafeEntry(
                    f"{b'/'.join(parts)!r}: {part!r} is not a directory", offset=offset
                )
            node = child
        self._last = (parts, node)
        return node

    def lookup(self, parts: tuple[bytes, ...]) -> Node | None:
        node: Node | None = self.root
        for part in parts:
            if node is None or node.children is None:
                return None
            node = node.children.get(part)
        return node

    def put(self, parts: tuple[bytes, ...], node: Node, offset: int) -> None:
        """Place ``node`` at ``parts`` (non-empty), replacing what was there."""
        parent = self.directory(parts[:-1], offset)
        assert parent.children is not None
        old = parent.children.get(parts[-1])
        self.newest = max(self.newest, (node.mtime, node.mtime_nsec))
        if old is not None and old.is_dir and node.is_dir:
            # Re-listing a directory re-applies its metadata; its contents (and an
            # opaque marker met earlier) stay.
            self._relist(old, node)
            return
        if old is not None and old.is_dir:
            self._last = ((), self.root)  # the remembered parent may be below ``old``
        if old is not None and old.whiteout and node.is_dir:
            node.xattrs[OPAQUE_XATTR] = b"y"  # see directory(): a recreated directory
        parent.children[parts[-1]] = node

    def set_root(self, node: Node, offset: int) -> None:
        if not node.is_dir:
            raise UnsafeEntry("the archive root must be a directory", offset=offset)
        self.newest = max(self.newest, (node.mtime, node.mtime_nsec))
        self._relist(self.root, node)

    def whiteout(self, parts: tuple[bytes, ...], entry_node: Node, offset: int) -> str | None:
        """Apply an OCI whiteout member; returns "opaque", "whiteout" or None (ignored).

        ``.wh..wh..opq`` marks its directory opaque (``trusted.overlay.opaque=y``);
        ``.wh.NAME`` becomes a 0/0 character device NAME, owned as the member
        was, which is what overlayfs reads as "deleted below". Per the OCI spec a
        whiteout hides lower layers only: if this layer already has NAME, NAME
        stays (a directory becomes opaque, as that is how it hides what is below);
        a NAME that comes after the whiteout replaces the device.
        """
        base = parts[-1]
        if base == OPAQUE_MARKER:
            self.directory(parts[:-1], offset).xattrs[OPAQUE_XATTR] = b"y"
            return "opaque"
        if base.startswith(WHITEOUT_META_PREFIX):
            return None
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in (b"", b".", b".."):
            raise UnsafeEntry(f"whiteout {base!r} names no entry", offset=offset)
        parent = self.directory(parts[:-1], offset)
        assert parent.children is not None
        existing = parent.children.get(hidden)
        if existing is not None and not existing.whiteout:
            if existing.is_dir:
                existing.xattrs[OPAQUE_XATTR] = b"y"
            return "whiteout"
        device = Node(
            stat.S_IFCHR,
            entry_node.uid,
            entry_node.gid,
            entry_node.mtime,
            entry_node.mtime_nsec,
            NO_XATTRS,
            whiteout=True,
        )
        self.put((*parts[:-1], hidden), device, offset)
        return "whiteout"
