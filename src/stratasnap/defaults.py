"""Where stratasnap keeps things when nobody says: one answer for the CLI and the server.

As root (the usual case: a node daemon next to containerd) the system paths;
as anyone else the user's own XDG directories, so that ``stratasnap`` and
``stratasnap serve`` work out of the box without privileges too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["LOCK_NAME", "default_address", "default_root"]

#: The lock file in every snapshotter root: a server holds it (flock) while it
#: serves the root, and ``stratasnap check --repair`` while it repairs.
LOCK_NAME = ".stratasnap.lock"


def default_root() -> Path:
    """``/var/lib/stratasnap`` as root, else ``$XDG_DATA_HOME/stratasnap`` (or ~/.local/share)."""
    if os.geteuid() == 0:
        return Path("/var/lib/stratasnap")
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "stratasnap"


def default_address() -> Path:
    """``/run/stratasnap/stratasnap.sock`` as root, else under ``$XDG_RUNTIME_DIR`` (or /tmp)."""
    if os.geteuid() == 0:
        return Path("/run/stratasnap/stratasnap.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = Path(runtime) if os.path.isabs(runtime) else Path(tempfile.gettempdir())
    return base / f"stratasnap-{os.geteuid()}" / "stratasnap.sock"
