"""The ``serve`` and ``config`` verbs of the ``stratasnap`` command (click).

Wire them into the main group with ``cli.add_command(serve)`` and
``cli.add_command(config)``::

    stratasnap serve [--config FILE] [--root DIR] [--address SOCK] [--backend NAME]
                     [--log-level LEVEL] [--metrics-address HOST:PORT] [--socket-group GROUP]
    stratasnap config default
    stratasnap config containerd [--config FILE] [--root DIR] [--address SOCK] [--backend NAME]

Values come from, strongest first: the verb's own flags, the main group's
``--root``/``--backend``/``-o KEY=VALUE`` when given explicitly (or through
``STRATASNAP_ROOT``/``STRATASNAP_BACKEND``), the config file, the defaults.
A bad config exits 2, a server that cannot start exits 1, each with one line
on stderr. Importing this module does not import grpc.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import click

from .config import (
    DEFAULT_ADDRESS,
    DEFAULT_ROOT,
    LOG_LEVELS,
    Config,
    ConfigError,
    containerd_snippet,
    default_config_text,
    load_config,
)
from .grpc_polling import poll_on_serving_thread

__all__ = ["config", "serve"]

_PROG = "stratasnap"


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"{_PROG}: {message}", err=True)
    click.get_current_context().exit(code)


def _global(name: str) -> Any:
    """The main group's ``name`` option, if the user gave it (flag or environment)."""
    ctx = click.get_current_context()
    root = ctx.find_root()
    if root is ctx or name not in root.params:
        return None
    source = root.get_parameter_source(name)
    if source in (None, click.core.ParameterSource.DEFAULT):
        return None
    value = root.params[name]
    return value or None


def _load(
    config_file: Path | None,
    root: Path | None,
    address: Path | None,
    backend: str | None,
    **more: str | None,
) -> Config:
    try:
        return load_config(
            config_file,
            root=root if root is not None else _global("root"),
            address=address,
            backend=backend if backend is not None else _global("backend"),
            options=_global("options"),
            **more,
        )
    except ConfigError as e:
        _fail(str(e), 2)


_config_file = click.option(
    "--config",
    "-c",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="STRATASNAP_CONFIG",
    show_envvar=True,
    help="TOML config file (`stratasnap config default` prints one).",
)
_root = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Where snapshots live. [default: {DEFAULT_ROOT}]",
)
_address = click.option(
    "--address",
    "-a",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Unix socket to serve on. [default: {DEFAULT_ADDRESS}]",
)
_backend = click.option(
    "--backend", metavar="NAME", help="Backend of the default snapshotter. [default: native]"
)


@click.command()
@_config_file
@_root
@_address
@_backend
@click.option(
    "--log-level",
    type=click.Choice([*LOG_LEVELS, "warn"], case_sensitive=False),
    help="Log level. [default: info]",
)
@click.option(
    "--metrics-address",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics.",
)
@click.option(
    "--socket-group",
    metavar="GROUP",
    help="Group allowed to use the socket (mode 0660). [default: owner only, 0600]",
)
def serve(
    config_file: Path | None,
    root: Path | None,
    address: Path | None,
    backend: str | None,
    log_level: str | None,
    metrics_address: str | None,
    socket_group: str | None,
) -> None:
    """Serve containerd's snapshots API on a unix socket, until SIGTERM or SIGINT.

    containerd uses it as a proxy plugin: `stratasnap config containerd` prints
    the block for its config.toml.
    """
    cfg = _load(
        config_file,
        root,
        address,
        backend,
        log_level=log_level,
        metrics_address=metrics_address,
        socket_group=socket_group,
    )
    # Before the daemon's import of grpc, which reads this setting once.
    poll_on_serving_thread()
    from .daemon import DaemonError
    from .daemon import serve as run

    try:
        run(cfg)
    except DaemonError as e:
        _fail(str(e), 1)


@click.group()
def config() -> None:
    """Print configuration: a default config file, or containerd's part."""


@config.command("default")
def config_default() -> None:
    """Print a commented config file holding the defaults."""
    click.echo(default_config_text(), nl=False)


@config.command("containerd")
@_config_file
@_root
@_address
@_backend
def config_containerd(
    config_file: Path | None, root: Path | None, address: Path | None, backend: str | None
) -> None:
    """Print the [proxy_plugins] block for containerd's config.toml.

    The backend options (`-o KEY=VALUE` or the config file) are checked as the
    server would check them: a bad one exits 2 instead of printing a snippet
    with the wrong capabilities.
    """
    try:
        snippet = containerd_snippet(_load(config_file, root, address, backend))
    except ConfigError as e:
        _fail(str(e), 2)
    click.echo(snippet, nl=False)
