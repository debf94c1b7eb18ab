"""The ``stratasnap`` group: global options, the lazily opened snapshotter, error exits."""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import click

from ..defaults import default_root
from ..errors import SnapshotError

if TYPE_CHECKING:
    from ..snapshotter import Snapshotter

__all__ = ["PROG", "Session", "cli", "default_root", "pairs", "pass_snapshotter"]

PROG = "stratasnap"
P = ParamSpec("P")
R = TypeVar("R")


def pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """Click callback: ``k=v`` strings to a dict (``k=`` keeps an empty value; last one wins)."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        out[key] = value
    return out


def error_line(exc: BaseException) -> str:
    """One line for stderr: ``stratasnap: snapshot "k": not found``."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {os.fsdecode(exc.filename)}" if exc.filename is not None else ""
        return f"{PROG}: {exc.strerror}{where}"
    return f"{PROG}: {exc}"


class Session:
    """The global options, and the snapshotter opened on first use (closed with the context)."""

    def __init__(self, root: Path, backend: str, options: dict[str, str]) -> None:
        self.root = root
        self.backend = backend
        self.options = options
        self._snapshotter: Snapshotter | None = None

    def snapshotter(self) -> Snapshotter:
        if self._snapshotter is None:
            from ..backends import BACKENDS, open_snapshotter

            root_ctx = click.get_current_context().find_root()
            if self.backend not in BACKENDS:
                raise click.BadParameter(
                    f"{self.backend!r} is not one of: {', '.join(sorted(BACKENDS))}",
                    ctx=root_ctx,
                    param_hint="'--backend'",
                )
            sn = open_snapshotter(self.root, self.backend, **self.options)
            root_ctx.call_on_close(sn.close)
            self._snapshotter = sn
        return self._snapshotter


def pass_snapshotter(
    f: Callable[Concatenate[Snapshotter, P], R],
) -> Callable[P, R]:
    """Decorator: call the command with the opened snapshotter as its first argument."""

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        session = click.get_current_context().find_object(Session)
        assert session is not None
        return f(session.snapshotter(), *args, **kwargs)

    return wrapper


class _Group(click.Group):
    """Lists verbs in workflow order; turns expected errors into one line and an exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SnapshotError as exc:
            click.echo(error_line(exc), err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise  # click handles a closed pipe quietly
            click.echo(error_line(exc), err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="STRATASNAP_ROOT",
    default=None,
    show_envvar=True,
    help="Root directory of the snapshot store. "
    "[default: /var/lib/stratasnap as root, else $XDG_DATA_HOME/stratasnap]",
)
@click.option(
    "--backend",
    default="native",
    show_default=True,
    envvar="STRATASNAP_BACKEND",
    show_envvar=True,
    metavar="NAME",
    help="Storage backend: native, overlay, blockfile, erofs or btrfs.",
)
@click.option(
    "--option",
    "-o",
    "options",
    multiple=True,
    callback=pairs,
    metavar="KEY=VALUE",
    help="Option for the backend, repeatable.",
)
@click.version_option(package_name="stratasnap", prog_name=PROG)
@click.pass_context
def cli(ctx: click.Context, root: Path | None, backend: str, options: dict[str, str]) -> None:
    """Manage a stratasnap snapshot store directly, like `ctr snapshots`.

    A snapshot is active (writable), a view (read-only) or committed (an
    immutable layer that other snapshots build on). Keys are any text.

    \b
    Example: make a layer, commit it, and start a container rootfs on it:
      stratasnap prepare layer-1
      stratasnap commit base layer-1
      stratasnap prepare ctr-1 base --mount /mnt/ctr-1
      stratasnap tree
    """
    ctx.obj = Session(root if root is not None else default_root(), backend, options)
