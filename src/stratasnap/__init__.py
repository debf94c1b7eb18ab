"""stratasnap: a containerd-compatible snapshotter.

Use it as a library::

    from stratasnap import open_snapshotter

    with open_snapshotter("/var/lib/stratasnap") as sn:
        mounts = sn.prepare("layer-1")
        ...
        sn.commit("base", "layer-1")
"""

from __future__ import annotations

from . import errors
from .backends import open_snapshotter
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SnapshotError,
    Unavailable,
    Unimplemented,
)
from .snapshotter import BaseSnapshotter, Snapshotter
from .types import Info, Kind, Mount, Reclaimed, Usage

__all__ = [
    "AlreadyExists",
    "BaseSnapshotter",
    "FailedPrecondition",
    "Info",
    "InvalidArgument",
    "Kind",
    "Mount",
    "NotFound",
    "Reclaimed",
    "ResourceExhausted",
    "SnapshotError",
    "Snapshotter",
    "Unavailable",
    "Unimplemented",
    "Usage",
    "errors",
    "open_snapshotter",
]
