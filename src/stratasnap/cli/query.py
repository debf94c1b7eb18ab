"""Verbs that look at the store: ls, info, usage, tree, cleanup."""

from __future__ import annotations

import json
from collections import defaultdict

import click

from ..errors import NotFound, SnapshotError
from ..snapshotter import BaseSnapshotter, Snapshotter
from ..types import Usage
from ._app import error_line, pass_snapshotter
from ._format import human_size, info_dict, table

__all__ = ["cleanup", "info", "ls", "tree", "usage"]


@click.command()
@click.option(
    "--filter",
    "-f",
    "filters",
    multiple=True,
    metavar="FILTER",
    help="containerd filter; repeat for OR, use ',' inside one for AND.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one snapshot a line.")
@pass_snapshotter
def ls(sn: Snapshotter, filters: tuple[str, ...], as_json: bool) -> None:
    """List snapshots, sorted by key: KEY, PARENT and KIND.

    Filters use containerd's language over the fields name, parent, kind
    and labels.<key>, with ==, != and ~= (regular expression). --json
    prints every field: name, parent, kind, labels, created, updated.

    \b
    Examples:
      stratasnap ls
      stratasnap ls --filter 'kind==committed' --filter 'labels.stage'
      stratasnap ls --json --filter 'labels."containerd.io/gc.root"'
    """
    infos = sorted(sn.walk(*filters), key=lambda i: i.name)
    if as_json:
        if not infos:
            click.echo("[]")
            return
        click.echo("[")
        for n, i in enumerate(infos, 1):
            click.echo(json.dumps(info_dict(i)) + ("," if n < len(infos) else ""))
        click.echo("]")
    else:
        table(("KEY", "PARENT", "KIND"), ((i.name, i.parent, str(i.kind)) for i in infos))


@click.command()
@click.argument("key")
@pass_snapshotter
def info(sn: Snapshotter, key: str) -> None:
    """Print what is known about snapshot KEY, as JSON.

    Fields: name, parent ("" for none), kind (active, view or committed),
    labels, created and updated (RFC 3339, UTC), and "storage" where the
    backend recorded facts about a committed snapshot's storage (the erofs
    backend: the image's sha256).

    \b
    Example:
      stratasnap info base
    """
    shown = info_dict(sn.stat(key))
    details = sn.details(key) if isinstance(sn, BaseSnapshotter) else {}
    if details:
        shown["storage"] = details
    click.echo(json.dumps(shown, indent=4))


@click.command()
@click.argument("keys", nargs=-1, metavar="[KEY]...")
@click.option("--bytes", "-b", "in_bytes", is_flag=True, help="Print sizes in bytes.")
@pass_snapshotter
def usage(sn: Snapshotter, keys: tuple[str, ...], in_bytes: bool) -> None:
    """Print the disk use of snapshots: KEY, SIZE and INODES.

    Each KEY is a snapshot (default: all of them). SIZE is the allocated
    space of the snapshot itself, parents excluded; committed snapshots
    report what was measured at commit, active ones are measured now.
    Failures are reported and the exit code is the first one's.

    \b
    Examples:
      stratasnap usage
      stratasnap usage --bytes ctr-1
    """
    rows: list[tuple[str, Usage]] = []
    first = 0
    if keys:
        for key in keys:
            try:
                rows.append((key, sn.usage(key)))
            except SnapshotError as exc:
                click.echo(error_line(exc), err=True)
                first = first or exc.exit_code
    else:
        for name in sorted(i.name for i in sn.walk()):
            try:
                rows.append((name, sn.usage(name)))
            except NotFound:
                continue  # removed since the walk
    size = str if in_bytes else human_size
    table(("KEY", "SIZE", "INODES"), ((k, size(u.size), str(u.inodes)) for k, u in rows))
    if first:
        click.get_current_context().exit(first)


@click.command()
@pass_snapshotter
def tree(sn: Snapshotter) -> None:
    """Print all snapshots as a tree of parents and children.

    Each child is printed below its parent, indented and marked with \\_.

    \b
    Example:
      stratasnap tree
    """
    infos = {i.name: i for i in sn.walk()}
    children: dict[str, list[str]] = defaultdict(list)
    roots: list[str] = []
    for name, i in infos.items():
        if i.parent and i.parent in infos:
            children[i.parent].append(name)
        else:
            roots.append(name)
    stack = [(name, 0) for name in sorted(roots, reverse=True)]
    while stack:
        name, depth = stack.pop()
        click.echo(f"{'  ' * depth}\\_ {name}" if depth else name)
        stack.extend((c, depth + 1) for c in sorted(children[name], reverse=True))


@click.command()
@pass_snapshotter
def cleanup(sn: Snapshotter) -> None:
    """Reclaim storage that no snapshot owns; print what was reclaimed.

    Removes leftovers of interrupted operations (crash remains, half-made
    or half-removed snapshot directories). Safe to run any time.

    \b
    Example:
      stratasnap cleanup
    """
    reclaimed = sn.cleanup()
    for path in reclaimed.paths:
        click.echo(path)
    n = len(reclaimed.paths)
    click.echo(f"reclaimed {n} path{'' if n == 1 else 's'}, {human_size(reclaimed.size)}")
