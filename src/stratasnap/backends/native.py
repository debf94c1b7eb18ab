"""The native backend: every snapshot is a full directory copy of its parent.

Portable and simple (no overlayfs, works without root except for mounting);
the cost is a copy per prepare, made cheap by reflinks where the filesystem
has them (xfs, btrfs). Mounts are bind mounts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ..fs.copy import copy_tree
from ..metastore import Record
from ..snapshotter import BaseSnapshotter, unknown_options
from ..types import Kind, Mount

__all__ = ["NativeSnapshotter"]


def bind_mounts(rec: Record, storage_of: Callable[[int], Path]) -> list[Mount]:
    """The bind mount of a snapshot whose storage is a whole tree (native, btrfs).

    An active snapshot binds its own tree rw; a view binds its parent's read-only
    (it has no storage of its own), as containerd's native and btrfs snapshotters do.
    """
    if rec.info.kind is Kind.VIEW and rec.parent_ids:
        source = storage_of(rec.parent_ids[0])
    else:
        source = storage_of(rec.id)
    mode = "ro" if rec.info.kind is Kind.VIEW else "rw"
    return [Mount(type="bind", source=str(source), options=("rbind", mode))]


class NativeSnapshotter(BaseSnapshotter):
    """Snapshots as directories under ``<root>/snapshots/<id>``."""

    backend_name = "native"

    @classmethod
    def capabilities_for(cls, options: Mapping[str, object]) -> tuple[str, ...]:
        if options:  # it has none: the same refusal as opening one would give
            raise unknown_options(cls.backend_name, options)
        return cls.capabilities

    def _populate(
        self, work: Path, kind: Kind, parent: Record | None, labels: Mapping[str, str]
    ) -> None:
        # A view binds its parent read-only: nothing to copy.
        if parent is not None and kind is Kind.ACTIVE:
            copy_tree(self.storage_dir(parent.id), work)

    def _mounts(self, rec: Record) -> list[Mount]:
        return bind_mounts(rec, self.storage_dir)
