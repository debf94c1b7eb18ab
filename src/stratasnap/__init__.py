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
from .snapshotter import Snapshotter
from .types import Info, Kind, Mount, Reclaimed, Usage

__all__ = [
    "AlreadyExists",
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


def __getattr__(name: str) -> object:
    # open_snapshotter pulls in the backends; import it lazily so that
    # `import stratasnap` stays cheap for code that only needs the types.
    if name == "open_snapshotter":
        from .backends import open_snapshotter

        return open_snapshotter
    raise AttributeError(name)
