"""Reading layer tars: one streaming reader and one set of rules for every user.

Below both ``images`` (the layer applier) and ``erofs`` (the tar -> EROFS
converter); depends only on :mod:`stratasnap.errors`.

Modules: ``reader`` (``TarReader``, ``TarEntry``, member type constants and
size limits), ``names`` (``split_name``: a member name as safe path
components), ``errors`` (why a tar was refused; all InvalidArgument).
"""

from __future__ import annotations

from .errors import LayerTooLarge, TarFormatError, TruncatedTar, UnsafeEntry, UnsupportedEntry
from .names import NAME_MAX, split_name
from .reader import BLK, CHR, DIR, FIFO, HARDLINK, REG, SYMLINK, TarEntry, TarReader

__all__ = [
    "BLK",
    "CHR",
    "DIR",
    "FIFO",
    "HARDLINK",
    "NAME_MAX",
    "REG",
    "SYMLINK",
    "LayerTooLarge",
    "TarEntry",
    "TarFormatError",
    "TarReader",
    "TruncatedTar",
    "UnsafeEntry",
    "UnsupportedEntry",
    "split_name",
]
