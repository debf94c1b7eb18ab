"""Options of the overlay backend, and the sizes it reads from labels and config.

Options come from the config file (TOML: real booleans, integers, lists) or
the command line (``--option k=v``: always strings), so each parser takes both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..fs.overlay_image import MAX_SIZE, MIN_SIZE

__all__ = [
    "MAX_SIZE_LABEL",
    "OverlayOptions",
    "parse_bool",
    "parse_size_label",
    "parse_size_option",
    "parse_words",
]

#: containerd's label for the size limit of a writable layer, in bytes.
MAX_SIZE_LABEL = "containerd.io/snapshot/max-size"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*(\d+)\s*([a-zA-Z]*)\s*")


def parse_bool(name: str, value: object, backend: str = "overlay") -> bool:
    """A boolean option: a TOML boolean, or true/false/yes/no/on/off/1/0 as text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidArgument(f"{backend} option {name}={value!r}: expected true or false")


def parse_words(name: str, value: object, backend: str = "overlay") -> tuple[str, ...]:
    """A list option: a TOML list of strings, or one comma-separated string."""
    if isinstance(value, str):
        # The command line gives one string: "volatile,metacopy=on".
        return tuple(w for w in (p.strip() for p in value.split(",")) if w)
    if isinstance(value, Iterable) and all(isinstance(w, str) for w in value):
        return tuple(str(w) for w in value)
    raise InvalidArgument(f"{backend} option {name}={value!r}: expected a list of words")


def _check_range(what: str, value: str, size: int) -> int:
    if size < MIN_SIZE or size > MAX_SIZE:
        raise InvalidArgument(
            f"{what} {value!r}: a size limit must be between {MIN_SIZE} and {MAX_SIZE} bytes"
        )
    return size


def parse_size_option(name: str, value: object, backend: str) -> int:
    """``default_size``: bytes as an integer, or a string such as ``"10GiB"``; 0 is none."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{backend} option {name}={value!r}: expected a size")
    if isinstance(value, int):
        size, text = value, str(value)
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise InvalidArgument(
                f"{backend} option {name}={value!r}: expected a size such as 1073741824 or 10GiB"
            )
        size, text = int(m.group(1)) * _UNITS[m.group(2).lower()], value
    else:
        raise InvalidArgument(f"{backend} option {name}={value!r}: expected a size")
    if size == 0:
        return 0
    return _check_range(f"{backend} option {name}", text, size)


def parse_size_label(labels: Mapping[str, str]) -> int | None:
    """The ``max-size`` label in bytes, None without one; malformed: InvalidArgument.

    containerd parses it as a plain unsigned decimal, so no units here. ``0``
    asks for no limit, even when the snapshotter has a ``default_size``.
    """
    value = labels.get(MAX_SIZE_LABEL)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise InvalidArgument(
            f"label {MAX_SIZE_LABEL}={value!r}: expected a size in bytes (a decimal integer)"
        )
    size = int(value)
    return 0 if size == 0 else _check_range(f"label {MAX_SIZE_LABEL}", value, size)


@dataclass(frozen=True)
class OverlayOptions:
    """What an overlay snapshotter was opened with.

    ``upperdir_label``: add ``containerd.io/snapshot/overlay.upperdir`` to
    Stat, Update and Walk results. ``sync_remove``: delete storage in Remove
    (else Remove only renames it aside and the reaper deletes it moments
    later: see :mod:`stratasnap.reaper`).
    ``mount_options``: extra overlay options (``volatile``, ``index=on``...).
    ``default_size``: size limit in bytes of every writable layer without a
    ``max-size`` label (0: unlimited). ``slow_chown``: on a kernel without
    idmapped overlay layers (before 5.19), accept uid/gid mapping labels
    anyway, give the upper to the mapped root and hand out plain mounts,
    leaving containerd to chown the layers (slow); without it such a
    prepare is FailedPrecondition.
    """

    upperdir_label: bool = False
    sync_remove: bool = False
    mount_options: tuple[str, ...] = ()
    default_size: int = 0
    slow_chown: bool = False

    @classmethod
    def take(cls, options: dict[str, object], backend: str = "overlay") -> OverlayOptions:
        """Parse and remove these options from ``options`` (the rest are another's or unknown).

        ``backend`` names the backend in error messages (erofs shares these options).
        """
        b = backend
        parsed = cls(
            upperdir_label=parse_bool("upperdir_label", options.pop("upperdir_label", False), b),
            sync_remove=parse_bool("sync_remove", options.pop("sync_remove", False), b),
            mount_options=parse_words("mount_options", options.pop("mount_options", ()), b),
            default_size=parse_size_option("default_size", options.pop("default_size", 0), b),
            slow_chown=parse_bool("slow_chown", options.pop("slow_chown", False), b),
        )
        return parsed
