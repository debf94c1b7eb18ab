"""``python -m stratasnap.server``: the ``serve`` and ``config`` verbs on their own.

The same click commands the ``stratasnap`` command wires in (see
:mod:`stratasnap.server.commands`)::

    python -m stratasnap.server serve --root DIR --address SOCK [--backend NAME] ...
    python -m stratasnap.server config default
    python -m stratasnap.server config containerd [--config FILE] [--root DIR] ...
"""

from __future__ import annotations

import click

from .commands import config, serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """stratasnap's gRPC server (containerd's snapshots API on a unix socket)."""


main.add_command(serve)
main.add_command(config)

if __name__ == "__main__":
    main(prog_name="python -m stratasnap.server")
