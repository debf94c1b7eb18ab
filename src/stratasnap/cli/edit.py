"""Verbs that change snapshots: prepare, view, commit, rm, label, mounts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import click

from ..errors import SnapshotError
from ..snapshotter import Snapshotter
from ..types import Mount
from ._app import PROG, error_line, pairs, pass_snapshotter
from ._mount import mount_at, print_mounts

__all__ = ["commit", "label", "mounts", "prepare", "rm", "view"]

_label_option = click.option(
    "--label",
    "-l",
    "labels",
    multiple=True,
    callback=pairs,
    metavar="KEY=VALUE",
    help="Label to set on the snapshot, repeatable.",
)
_mount_option = click.option(
    "--mount",
    "-m",
    "target",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Mount the new snapshot at this existing directory instead of printing its mounts "
    "(needs root). If mounting fails, the snapshot is removed again.",
)


def _finish(sn: Snapshotter, key: str, mounts: list[Mount], target: Path | None) -> None:
    """Print the mounts, or mount them at ``target`` and undo the snapshot if that fails."""
    if target is None:
        print_mounts(mounts)
        return
    try:
        mount_at(mounts, target)
    except (SnapshotError, OSError, ValueError) as exc:
        code = exc.exit_code if isinstance(exc, SnapshotError) else 1
        if isinstance(exc, OSError) and exc.strerror and exc.filename in (target, str(target)):
            reason = exc.strerror  # the target is named already
        else:
            reason = error_line(exc).removeprefix(f"{PROG}: ")
        try:
            sn.remove(key)
            undone = "the snapshot was removed again"
        except (SnapshotError, OSError):
            undone = "the snapshot is still there (remove it with stratasnap rm)"
        click.echo(f'{PROG}: mounting snapshot "{key}" at {target}: {reason}; {undone}', err=True)
        click.get_current_context().exit(code)


@click.command()
@click.argument("key")
@click.argument("parent", default="")
@_label_option
@_mount_option
@pass_snapshotter
def prepare(
    sn: Snapshotter, key: str, parent: str, labels: dict[str, str], target: Path | None
) -> None:
    """Create an active (writable) snapshot KEY on top of PARENT.

    KEY names the new snapshot (any text not yet used). PARENT, if given,
    must be a committed snapshot; without it the snapshot starts empty.
    Prints the mount command(s) that assemble it, with TARGET standing for
    the mount point, or mounts it with --mount.

    \b
    Examples:
      stratasnap prepare layer-1
      stratasnap prepare ctr-1 base --label app=web --mount /mnt/ctr-1
    """
    _finish(sn, key, sn.prepare(key, parent, labels or None), target)


@click.command()
@click.argument("key")
@click.argument("parent")
@_label_option
@_mount_option
@pass_snapshotter
def view(
    sn: Snapshotter, key: str, parent: str, labels: dict[str, str], target: Path | None
) -> None:
    """Create a read-only snapshot KEY of the committed snapshot PARENT.

    KEY names the new view; PARENT is the committed snapshot it shows.
    Prints the mount command(s), with TARGET standing for the mount point,
    or mounts it with --mount.

    \b
    Example:
      stratasnap view inspect-base base --mount /mnt/base
    """
    _finish(sn, key, sn.view(key, parent, labels or None), target)


@click.command()
@click.argument("name")
@click.argument("key")
@_label_option
@pass_snapshotter
def commit(sn: Snapshotter, name: str, key: str, labels: dict[str, str]) -> None:
    """Turn the active snapshot KEY into the committed snapshot NAME.

    NAME is the new, immutable snapshot that others can use as a parent;
    KEY is the active snapshot to commit, which is gone afterwards. Labels
    given here replace the snapshot's labels. Unmount KEY first.

    \b
    Example:
      stratasnap commit base layer-1 --label stage=base
    """
    sn.commit(name, key, labels or None)


def _each(keys: tuple[str, ...], call: Callable[[str], object]) -> None:
    """Run ``call`` on every key; report each failure, exit with the first one's code."""
    first = 0
    for key in keys:
        try:
            call(key)
        except (SnapshotError, OSError) as exc:
            click.echo(error_line(exc), err=True)
            first = first or (exc.exit_code if isinstance(exc, SnapshotError) else 1)
    if first:
        click.get_current_context().exit(first)


@click.command()
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@pass_snapshotter
def rm(sn: Snapshotter, keys: tuple[str, ...]) -> None:
    """Remove snapshots and their storage.

    Each KEY is a snapshot without children (remove children first). Every
    key is tried; each failure is reported, and the exit code is the first
    failure's. The storage is deleted before the command exits, also where
    the backend defers it (overlay); no cleanup needed.

    \b
    Example:
      stratasnap rm ctr-1 inspect-base
    """
    _each(keys, sn.remove)


@click.command()
@click.argument("key")
@click.argument("target")
@pass_snapshotter
def mounts(sn: Snapshotter, key: str, target: str) -> None:
    """Print the mount command(s) that assemble snapshot KEY at TARGET.

    KEY is an active snapshot or a view; TARGET is the mount point to put
    in the commands (nothing is mounted).

    \b
    Example:
      stratasnap mounts ctr-1 /mnt/ctr-1 | sh
    """
    print_mounts(sn.mounts(key), target)


@click.command()
@click.argument("key")
@click.argument("changes", nargs=-1, callback=pairs, metavar="[NAME=VALUE|NAME=]...")
@pass_snapshotter
def label(sn: Snapshotter, key: str, changes: dict[str, str]) -> None:
    """Set or delete labels of snapshot KEY, then print its labels.

    KEY is the snapshot; each NAME=VALUE sets label NAME, each NAME= (empty
    value) deletes it. Other labels are kept. Without changes, just prints
    the labels, one NAME=VALUE per line.

    \b
    Example:
      stratasnap label base owner=alice stage=
    """
    info = sn.stat(key)
    if changes:
        info = sn.update(
            dataclasses.replace(info, labels=changes), [f"labels.{k}" for k in changes]
        )
    for k, v in sorted(info.labels.items()):
        click.echo(f"{k}={v}")
