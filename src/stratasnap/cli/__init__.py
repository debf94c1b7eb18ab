"""The ``stratasnap`` command: a snapshot store on the command line, like ``ctr snapshots``.

``stratasnap [--root DIR] [--backend NAME] [-o KEY=VALUE]... VERB ...``; every
verb has ``--help``. An expected error (:class:`~stratasnap.errors.SnapshotError`)
prints one line on stderr and exits with that error's ``exit_code``.
"""

from __future__ import annotations

from ..server.commands import config, serve
from ._app import Session, cli, default_root, pass_snapshotter
from .check import check
from .edit import commit, label, mounts, prepare, rm, view
from .erofs import erofs
from .image import diff, image
from .query import cleanup, info, ls, tree, usage

__all__ = ["Session", "cli", "default_root", "main", "pass_snapshotter"]

_VERBS = (
    serve,
    prepare,
    view,
    commit,
    rm,
    mounts,
    label,
    ls,
    info,
    usage,
    tree,
    cleanup,
    check,
    image,
    diff,
    config,
    erofs,
)
for _verb in _VERBS:
    cli.add_command(_verb)


def main() -> None:
    """Console-script entry point (``stratasnap``, ``python -m stratasnap``)."""
    cli.main(prog_name="stratasnap")
