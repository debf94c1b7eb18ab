"""Printing a snapshot's mounts, or applying them at a directory (``--mount TARGET``)."""

from __future__ import annotations

from pathlib import Path

import click

from ..types import Mount

__all__ = ["PLACEHOLDER", "mount_at", "print_mounts"]

#: Stands for the mount point in printed ``mount`` commands when none was given.
PLACEHOLDER = "TARGET"


def print_mounts(mounts: list[Mount], target: str = PLACEHOLDER) -> None:
    for m in mounts:
        click.echo(m.command_line(target))


def mount_at(mounts: list[Mount], target: Path) -> None:
    """Mount ``mounts`` in order at ``target`` (needs root); all or nothing."""
    # ctypes and libc: only when mounting. The idmapped variant also applies
    # uidmap=/gidmap= options (overlay snapshots with mapping labels).
    from ..fs.idmapped import apply_idmapped_mounts as apply_mounts

    apply_mounts(mounts, target)
