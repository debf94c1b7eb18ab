"""Options of the btrfs backend (config file values typed, command-line ones as text)."""

from __future__ import annotations

from dataclasses import dataclass

from .overlay_options import parse_bool, parse_size_option

__all__ = ["BtrfsOptions"]


@dataclass(frozen=True)
class BtrfsOptions:
    """What a btrfs snapshotter was opened with.

    ``quota``: turn btrfs quotas (qgroups) on when opening, if they are not.
    ``default_size``: size limit in bytes of every active snapshot without a
    ``max-size`` label (0: unlimited); needs quotas.
    """

    quota: bool = False
    default_size: int = 0

    @classmethod
    def take(cls, options: dict[str, object]) -> BtrfsOptions:
        """Parse and remove this backend's options from ``options`` (the rest are unknown)."""
        return cls(
            quota=parse_bool("quota", options.pop("quota", False), "btrfs"),
            default_size=parse_size_option("default_size", options.pop("default_size", 0), "btrfs"),
        )
