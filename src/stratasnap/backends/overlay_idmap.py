"""ID-mapped snapshots: containerd's uid/gid mapping labels, parsed and checked.

A pod in a user namespace gets its snapshots with the labels
``containerd.io/snapshot/uidmapping`` and ``…/gidmapping``, each a
comma-separated list of ``containerID:hostID:size`` ranges. A snapshotter
that advertises ``remap-ids`` turns them into ``uidmap=``/``gidmap=`` mount
options (containerd's mount code then idmaps the lower layers, so nothing is
chowned) and gives the upper directory to the host ids of the container's
root, so that root in the container owns its writable layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InvalidArgument

__all__ = ["GIDMAP_LABEL", "UIDMAP_LABEL", "IDMapping", "IDRange", "parse_mapping_labels"]

UIDMAP_LABEL = "containerd.io/snapshot/uidmapping"
GIDMAP_LABEL = "containerd.io/snapshot/gidmapping"
_ID_MAX = (1 << 32) - 1  # ids are 32-bit; (uid_t)-1 is never a valid one


@dataclass(frozen=True)
class IDRange:
    """``size`` ids from ``container_id`` in the container are ``host_id``… on the host."""

    container_id: int
    host_id: int
    size: int


@dataclass(frozen=True)
class IDMapping:
    """The uid and gid ranges of one snapshot, and the label values they came from."""

    uids: tuple[IDRange, ...]
    gids: tuple[IDRange, ...]
    uid_label: str
    gid_label: str

    def root_pair(self) -> tuple[int, int]:
        """The host uid and gid of the container's root."""
        return _host_id_of_root(self.uids, UIDMAP_LABEL), _host_id_of_root(self.gids, GIDMAP_LABEL)


def _host_id_of_root(ranges: tuple[IDRange, ...], label: str) -> int:
    for r in ranges:
        if r.container_id <= 0 < r.container_id + r.size:
            return r.host_id - r.container_id
    raise InvalidArgument(f"label {label}: no range maps the container's root (id 0)")


def _parse(label: str, value: str) -> tuple[IDRange, ...]:
    ranges: list[IDRange] = []
    for part in value.split(","):
        fields = part.split(":")
        if len(fields) != 3 or not all(f.isascii() and f.isdigit() for f in fields):
            raise InvalidArgument(
                f"label {label}={value!r}: expected containerID:hostID:size[,...] (decimal)"
            )
        cid, hid, size = (int(f) for f in fields)
        if size == 0 or cid + size - 1 > _ID_MAX or hid + size - 1 > _ID_MAX:
            raise InvalidArgument(f"label {label}={value!r}: range {part!r} is empty or too large")
        ranges.append(IDRange(cid, hid, size))
    ordered = sorted(ranges, key=lambda r: r.container_id)
    for a, b in itertools.pairwise(ordered):
        if a.container_id + a.size > b.container_id:
            raise InvalidArgument(f"label {label}={value!r}: container id ranges overlap")
    return tuple(ranges)


def parse_mapping_labels(labels: Mapping[str, str]) -> IDMapping | None:
    """The snapshot's mapping, None without the labels; malformed: InvalidArgument.

    Both labels go together (containerd sets both); one alone is an error,
    as is a mapping without the container's root in it.
    """
    uid_value, gid_value = labels.get(UIDMAP_LABEL), labels.get(GIDMAP_LABEL)
    if uid_value is None and gid_value is None:
        return None
    if uid_value is None or gid_value is None:
        missing = UIDMAP_LABEL if uid_value is None else GIDMAP_LABEL
        raise InvalidArgument(f"label {missing} is missing: uid and gid mappings go together")
    mapping = IDMapping(
        uids=_parse(UIDMAP_LABEL, uid_value),
        gids=_parse(GIDMAP_LABEL, gid_value),
        uid_label=uid_value,
        gid_label=gid_value,
    )
    mapping.root_pair()  # fails now, naming the label, rather than at mount time
    return mapping
