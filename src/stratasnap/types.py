"""Values of the snapshot contract: Kind, Info, Usage, Mount."""

from __future__ import annotations

import calendar
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = ["EPOCH", "Info", "Kind", "Mount", "Reclaimed", "Timestamp", "Usage"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Timestamp(datetime):
    """A UTC datetime that keeps nanoseconds, where ``datetime`` stops at microseconds.

    The store records times in nanoseconds and containerd's wire format carries
    them; this keeps them on the way through. It is a ``datetime`` in every
    other respect (a derived datetime, e.g. from ``replace()``, falls back to
    its microseconds).
    """

    __slots__ = ("_epoch_ns",)
    _epoch_ns: int

    @classmethod
    def from_epoch_ns(cls, ns: int) -> Timestamp:
        """The instant ``ns`` nanoseconds after the Unix epoch, in UTC."""
        seconds, sub = divmod(ns, 1_000_000_000)
        d = datetime.fromtimestamp(seconds, UTC)
        t = cls(d.year, d.month, d.day, d.hour, d.minute, d.second, sub // 1000, tzinfo=UTC)
        t._epoch_ns = ns  # kept, not recomputed: Lists convert thousands of these
        return t

    @property
    def epoch_ns(self) -> int:
        """Nanoseconds since the Unix epoch."""
        ns: int | None = getattr(self, "_epoch_ns", None)
        if ns is None:  # derived by datetime arithmetic or replace(): microseconds
            ns = calendar.timegm(self.utctimetuple()) * 1_000_000_000 + self.microsecond * 1000
        return ns

    @property
    def nanosecond(self) -> int:
        """Nanoseconds within the second (0 to 999,999,999)."""
        return self.epoch_ns % 1_000_000_000


class Kind(enum.StrEnum):
    """What a snapshot is: writable, a read-only view, or an immutable layer."""

    ACTIVE = "active"
    VIEW = "view"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Info:
    """What is known about one snapshot.

    ``parent`` is ``""`` for a snapshot without one. ``created`` and
    ``updated`` are timezone-aware UTC datetimes.
    """

    name: str
    kind: Kind
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created: datetime = EPOCH
    updated: datetime = EPOCH


@dataclass(frozen=True)
class Usage:
    """Resources a snapshot uses on its own, parents excluded.

    ``size`` is allocated bytes (``st_blocks * 512``, like containerd), and
    ``inodes`` counts each inode once, directories included.
    """

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Mount:
    """One mount that, applied in order, assembles a snapshot's filesystem.

    ``target`` is empty for the root mount; a non-empty target is a sub-mount
    relative to the root (containerd's ``Mount.target``).
    """

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""

    def command_line(self, target: str) -> str:
        """The ``mount`` command that applies this mount at ``target`` (like ``ctr``)."""
        import shlex

        where = f"{target.rstrip('/')}/{self.target.lstrip('/')}" if self.target else target
        opts = f" -o {shlex.quote(','.join(self.options))}" if self.options else ""
        words = (self.type, self.source, where)
        return "mount -t {} {} {}".format(*map(shlex.quote, words)) + opts


@dataclass(frozen=True)
class Reclaimed:
    """What a cleanup removed: the paths it deleted and the bytes they held."""

    paths: tuple[str, ...] = ()
    size: int = 0
