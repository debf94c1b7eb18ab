"""Applying a snapshot's mounts at a directory, for ``--mount TARGET``."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..types import Mount

__all__ = ["mount_at", "print_mounts"]

#: Stands for the mount point in printed ``mount`` commands when none was given.
PLACEHOLDER = "TARGET"


def print_mounts(mounts: list[Mount], target: str = PLACEHOLDER) -> None:
    import click

    for m in mounts:
        click.echo(m.command_line(target))


def mount_at(mounts: list[Mount], target: Path) -> None:
    """Mount ``mounts`` in order at ``target`` (needs root, or a user namespace)."""
    try:
        from ..fs.mount import apply_mounts
    except ImportError:  # stratasnap.fs not there yet: use the mount(8) binary
        _mount_with_binary(mounts, target)
    else:
        apply_mounts(mounts, target)


def _mount_with_binary(mounts: list[Mount], target: Path) -> None:
    for m in mounts:
        where = target / m.target.lstrip("/") if m.target else target
        opts = ["-o", ",".join(m.options)] if m.options else []
        cmd = ["mount", "-t", m.type, *opts, m.source, str(where)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise OSError(r.returncode, r.stderr.strip() or f"{' '.join(cmd)} failed")
