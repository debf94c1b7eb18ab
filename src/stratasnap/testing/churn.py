"""Layers in, old layers out, never a Cleanup: what containerd does to a snapshotter, reduced.

Drives any snapshots API client (:class:`stratasnap.server.client.Client`, or a
snapshotter itself) whose parentless active snapshots mount as a ``bind`` of a
directory the caller can write (overlay, native: stratasnap's and containerd's).
The kill-loop test and ``benchmarks/killcampaign.py`` kill the server under it
and check afterwards, with :meth:`Churn.audit`, that every committed layer
still holds what was written into it.
"""

from __future__ import annotations

import errno
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ResourceExhausted, SnapshotError
from ..snapshotter import Snapshotter
from ..types import Kind

__all__ = ["Audit", "Churn", "layer_content"]


def layer_content(n: int, size: int) -> bytes:
    """The bytes layer ``n`` holds: different for every layer, cheap to make."""
    return (f"layer {n} ".encode() * (size // 8 + 1))[:size]


@dataclass(frozen=True)
class Audit:
    """What :meth:`Churn.audit` found: committed layers and the ids of their storage."""

    committed: tuple[str, ...]
    bad: tuple[str, ...]  # committed layers whose data is missing or wrong
    storage: frozenset[str]  # names under snapshots/ the committed layers own


@dataclass
class Churn:
    """Each step: prepare ``a<n>``, write a layer's data, commit it as ``c<n>``; every
    third step a container snapshot on the newest layer comes and goes; beyond
    ``keep`` committed layers the oldest is removed. When the disk is full the
    oldest layer is removed to make room."""

    layer_bytes: int = 1 << 20
    keep: int = 6
    n: int = 0
    full: int = 0  # ResourceExhausted or ENOSPC met
    committed: list[str] = field(default_factory=list)
    #: Layers whose commit had returned, never removed, and then missing from the list.
    lost: list[str] = field(default_factory=list)

    def resync(self, sn: Snapshotter) -> None:
        """After a restart: drop what a kill left half-done (as containerd's GC would)."""
        infos = list(sn.walk())
        for info in infos:
            if info.kind is not Kind.COMMITTED:
                sn.remove(info.name)
        names = [i.name for i in infos if i.kind is Kind.COMMITTED and i.name.startswith("c")]
        self.lost.extend(sorted(set(self.committed) - set(names)))
        self.committed = sorted(names, key=lambda k: int(k[1:]))

    def run(self, sn: Snapshotter, steps: int = 0) -> None:
        """Step until an error ends it (the server was killed), or ``steps`` steps (0: no end)."""
        done = 0
        while not steps or done < steps:
            done += 1
            self.n += 1
            key = f"a{self.n}"
            try:
                source = Path(sn.prepare(key)[0].source)
                (source / "data").write_bytes(layer_content(self.n, self.layer_bytes))
                sn.commit(f"c{self.n}", key)
            except (SnapshotError, OSError) as exc:
                if not _disk_full(exc):
                    raise
                self.full += 1
                with suppress(SnapshotError):
                    sn.remove(key)
                if self.committed:
                    sn.remove(self.committed.pop(0))
                continue
            self.committed.append(f"c{self.n}")
            if self.n % 3 == 0:
                sn.prepare(f"t{self.n}", self.committed[-1])
                sn.remove(f"t{self.n}")
            while len(self.committed) > self.keep:
                sn.remove(self.committed.pop(0))

    def audit(self, sn: Snapshotter) -> Audit:
        """Read every committed layer back through a view of it (then removed again)."""
        self.resync(sn)
        bad: list[str] = []
        storage: set[str] = set()
        for name in self.committed:
            view = f"audit-{name}"
            source = Path(sn.view(view, name)[0].source)
            try:
                storage.add(_storage_name(source))
                if (source / "data").read_bytes() != layer_content(int(name[1:]), self.layer_bytes):
                    bad.append(name)
            except OSError:
                bad.append(name)
            finally:
                sn.remove(view)
        return Audit(tuple(self.committed), tuple(bad), frozenset(storage))


def _disk_full(exc: SnapshotError | OSError) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # containerd (1.6) answers a full disk with UNKNOWN and the OS's message.
    return isinstance(exc, ResourceExhausted) or "no space left on device" in str(exc)


def _storage_name(source: Path) -> str:
    """``snapshots/<id>/fs`` (overlay) or ``snapshots/<id>`` (native) -> ``<id>``."""
    return source.parent.name if source.name == "fs" else source.name
