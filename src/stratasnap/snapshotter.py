"""The Snapshotter protocol (the contract every backend honours) and its shared base.

A snapshotter stores a tree of snapshots. Importing an image goes like this:
``prepare("extract-1 <chain-id>", parent="")`` returns the mounts of an empty
writable snapshot; the layer is unpacked into them; ``commit("<chain-id>",
"extract-1 <chain-id>")`` turns it into an immutable layer. The next layer is
prepared with that committed name as its parent, and so on. A container then
gets ``prepare(container_key, parent=<top chain-id>)``; ``view`` gives a
read-only snapshot instead. ``remove`` deletes leaves; ``cleanup`` reclaims
storage that no snapshot owns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol, runtime_checkable

from .types import Info, Mount, Reclaimed, Usage

__all__ = ["Snapshotter"]


@runtime_checkable
class Snapshotter(Protocol):
    """The calls of containerd's snapshots API, as Python methods."""

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create an active (writable) snapshot on top of ``parent``; return its mounts."""
        ...

    def view(
        self, key: str, parent: str, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create a read-only snapshot of ``parent``; return its mounts."""
        ...

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot."""
        ...

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> None:
        """Turn active ``key`` into committed ``name`` (``parent`` rebases an unparented one)."""
        ...

    def remove(self, key: str) -> None:
        """Remove a snapshot that has no children, and its storage."""
        ...

    def stat(self, key: str) -> Info:
        """What is known about one snapshot."""
        ...

    def update(self, info: Info, fieldpaths: Iterable[str] = ()) -> Info:
        """Replace labels (``labels``) or single labels (``labels.<key>``); return the result."""
        ...

    def usage(self, key: str) -> Usage:
        """Disk use of the snapshot itself, parents excluded."""
        ...

    def walk(self, *filters: str) -> Iterator[Info]:
        """Every snapshot matching any of ``filters`` (containerd's filter language)."""
        ...

    def cleanup(self) -> Reclaimed:
        """Reclaim storage no snapshot owns; return what was reclaimed."""
        ...

    def close(self) -> None:
        """Release the store; calling it again does nothing."""
        ...
