"""Backends, and ``open_snapshotter`` which picks one by name."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import InvalidArgument
from ..snapshotter import BaseSnapshotter

__all__ = ["BACKENDS", "open_snapshotter"]

#: Backend name -> "module:class". Imported on use so a backend's needs
#: (mount helpers, mkfs tools) cost nothing to those who do not use it.
BACKENDS: dict[str, str] = {
    "native": "stratasnap.backends.native:NativeSnapshotter",
    "overlay": "stratasnap.backends.overlay:OverlaySnapshotter",
    "blockfile": "stratasnap.backends.blockfile:BlockfileSnapshotter",
    "erofs": "stratasnap.backends.erofs:ErofsSnapshotter",
    "btrfs": "stratasnap.backends.btrfs:BtrfsSnapshotter",
}


def backend_class(backend: str) -> type[BaseSnapshotter]:
    """The class implementing ``backend``; InvalidArgument names the known ones."""
    try:
        target = BACKENDS[backend]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise InvalidArgument(f"unknown backend {backend!r} (known: {known})") from None
    module, _, cls = target.partition(":")
    found: type[BaseSnapshotter] = getattr(importlib.import_module(module), cls)
    return found


def open_snapshotter(
    root: str | Path, backend: str = "native", **options: object
) -> BaseSnapshotter:
    """Open (creating if needed) the snapshotter rooted at ``root``.

    ``options`` are the backend's own (see each backend's docs); an unknown
    option is InvalidArgument.
    """
    return backend_class(backend)(root, **options)
