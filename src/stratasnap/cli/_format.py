"""Output shapes shared by the verbs: tables, sizes, RFC 3339 times, Info as JSON."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import click

from ..types import Info, Timestamp

__all__ = ["human_size", "info_dict", "rfc3339", "table"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def rfc3339(when: datetime) -> str:
    """Like Go's RFC3339Nano: UTC with ``Z``, fraction without trailing zeros."""
    # A Timestamp from the store keeps nanoseconds; a plain datetime has microseconds.
    nanos = when.nanosecond if isinstance(when, Timestamp) else when.microsecond * 1000
    when = when.astimezone(UTC)
    frac = f"{nanos:09d}".rstrip("0")
    return when.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def human_size(size: int) -> str:
    """Binary units with one decimal (``4.0 KiB``), plain bytes under 1 KiB (``512 B``)."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    unit = 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.1f} {_UNITS[unit]}"


def info_dict(info: Info) -> dict[str, Any]:
    """Every field of an Info, JSON-ready (name, parent, kind, labels, created, updated)."""
    return {
        "name": info.name,
        "parent": info.parent,
        "kind": str(info.kind),
        "labels": dict(sorted(info.labels.items())),
        "created": rfc3339(info.created),
        "updated": rfc3339(info.updated),
    }


def table(header: Sequence[str], rows: Iterable[Sequence[str]], gap: int = 3) -> None:
    """Print left-aligned columns (like Go's tabwriter); the last column is not padded."""
    lines = [list(header), *(list(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [c.ljust(w + gap) for c, w in zip(line[:-1], widths, strict=False)]
        click.echo("".join(cells) + line[-1])
