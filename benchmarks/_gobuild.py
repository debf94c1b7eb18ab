"""Build the benchmarks' Go programs offline, against Debian's packaged containerd sources.

``goclient/`` (containerd's generated snapshots client) and ``goproxy/``
(containerd's own snapshotters behind the snapshots service) build in GOPATH
mode from ``/usr/share/gocode`` (``golang-github-containerd-containerd-dev``),
with no module download (``tests/e2e/gobuild.py`` does the building).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "tests") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "tests"))

from e2e.gobuild import GO_CONTAINERD, GOCODE  # noqa: E402
from e2e.gobuild import build_go as _build  # noqa: E402

__all__ = ["GOCODE", "GO_API", "build_go"]

GO_API = GO_CONTAINERD / "api/services/snapshots/v1"


def build_go(program: str, tmp: Path, what: str) -> tuple[Path | None, str]:
    """Build ``benchmarks/<program>/`` into ``tmp``: (binary, description) or (None, why not).

    ``what`` names the figures that need it, for the message when it cannot be built.
    """
    binary, description = _build(HERE / program, tmp / program, tmp)
    if binary is None:
        return None, f"{description}: {what} skipped"
    return binary, description
