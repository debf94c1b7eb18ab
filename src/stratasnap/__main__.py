"""``python -m stratasnap``: the ``stratasnap`` command."""

from stratasnap.cli import main

main()
