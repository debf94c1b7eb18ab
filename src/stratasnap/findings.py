"""What ``stratasnap check`` finds, as values: a survey of a root and the findings on it.

The :class:`Survey` is read once, without changing anything (the store read
only, the storage directory listed, the mount table and the loop devices
read). Each check is a function of it that yields :class:`Finding` values:
the store's own checks in :mod:`stratasnap.check`, the layout's and each
backend's in their ``_check`` class hook (:meth:`BaseSnapshotter._check`),
so a new backend adds the checks of its own storage next to its code.

A finding says what is wrong, where, and which :class:`Repair` would make it
right; :attr:`Repair.PERSON` means nothing safe can be done without a person.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .types import Kind

__all__ = ["Finding", "Repair", "Row", "Survey"]


class Repair(enum.Enum):
    """What ``check --repair`` does about a finding; the value says it to the operator."""

    #: Storage no snapshot owns: deleted, as cleanup() would (after releasing it).
    RECLAIM = "delete the storage (no snapshot owns it)"
    #: A remove killed before its commit: the storage goes back under its id.
    RESTORE = "move the storage back (its snapshot still exists)"
    #: A mount on storage no snapshot owns: unmounted.
    UNMOUNT = "unmount it (it is on storage no snapshot owns)"
    #: A loop device backed by an image no snapshot owns: detached.
    DETACH = "detach the loop device (its image belongs to no snapshot)"
    #: A step a killed commit left undone: finished (or undone) as opening the store does.
    FINISH = "finish the interrupted commit, as opening the store does"
    #: An active or view snapshot whose creation a power loss took back: made again
    #: from its parent, as opening the store does.
    REBUILD = "rebuild it from its parent, as opening the store does"
    #: Nothing automatic is safe: a person must decide.
    PERSON = "needs a person"


@dataclass(frozen=True)
class Finding:
    """One problem: a short ``code`` for scripts, where it is, what it is, and the repair."""

    code: str
    where: str
    what: str
    repair: Repair = Repair.PERSON

    def as_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "where": self.where,
            "what": self.what,
            "repair": self.repair.name.lower(),
            "repair_does": self.repair.value,
        }

    def __str__(self) -> str:
        return f"{self.code}: {self.where}: {self.what} ({self.repair.value})"


@dataclass(frozen=True)
class Row:
    """A snapshot as its store row says (what the layout checks need)."""

    id: int
    key: str
    kind: Kind | None  # None: a kind the store should never hold
    parent_id: int | None
    #: What the backend recorded about the storage at commit (e.g. an image digest).
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Survey:
    """Everything the checks look at, read once."""

    root: Path
    #: Snapshot rows by id.
    rows: dict[int, Row]
    #: Names in ``<root>/snapshots``.
    entries: frozenset[str]
    #: Names of ``new-*`` directories a live create holds locked.
    locked: frozenset[str]
    #: Mount points at or below ``<root>/snapshots``.
    mounts: tuple[Path, ...]
    #: Loop devices backed by files below ``<root>/snapshots``: (device, backing file).
    loops: tuple[tuple[Path, Path], ...]
    #: Problems SQLite itself reports (integrity and foreign keys).
    store_problems: tuple[str, ...] = field(default=())
    #: Whether checks may read all the data (e.g. hash every image): ``check --deep``.
    deep: bool = False

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    def owner_of(self, path: Path) -> int | None:
        """The id of the live snapshot whose storage holds ``path``, or None.

        ``rm-<id>`` of a live snapshot (a remove killed before its commit)
        still holds that snapshot's storage.
        """
        try:
            top = path.relative_to(self.snapshots_dir).parts[0]
        except (ValueError, IndexError):
            return None
        sid = top[3:] if top.startswith("rm-") else top
        return int(sid) if sid.isdigit() and int(sid) in self.rows else None

    def stored(self) -> Iterator[tuple[int, Row]]:
        """Rows whose storage directory exists, for a backend's own checks.

        A row without its directory is the layout check's finding already;
        a backend looking inside the storage skips it.
        """
        for sid, row in self.rows.items():
            if str(sid) in self.entries:
                yield sid, row

    def in_use(self, path: Path) -> bool:
        """Whether ``path`` lies in storage that something owns or is making."""
        try:
            top = path.relative_to(self.snapshots_dir).parts[0]
        except (ValueError, IndexError):
            return True  # not storage at all: not ours to judge
        return self.owner_of(path) is not None or top in self.locked
