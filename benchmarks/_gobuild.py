"""Build the benchmarks' Go programs offline, against Debian's packaged containerd sources.

``goclient/`` (containerd's generated snapshots client) and ``goproxy/``
(containerd's own snapshotters behind the snapshots service) build in GOPATH
mode from ``/usr/share/gocode`` (``golang-github-containerd-containerd-dev``),
with no module download.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

__all__ = ["GOCODE", "GO_API", "build_go"]

HERE = Path(__file__).resolve().parent
GOCODE = Path("/usr/share/gocode")
GO_API = GOCODE / "src/github.com/containerd/containerd/api/services/snapshots/v1"


def build_go(program: str, tmp: Path, what: str) -> tuple[Path | None, str]:
    """Build ``benchmarks/<program>/`` into ``tmp``: (binary, description) or (None, why not).

    ``what`` names the figures that need it, for the message when it cannot be built.
    """
    go = shutil.which("go")
    if go is None or not GO_API.is_dir():
        missing = "go" if go is None else str(GO_API)
        return None, (
            f"no {missing}: {what} skipped (apt-get install golang-go "
            "golang-github-containerd-containerd-dev)"
        )
    binary = tmp / program
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",  # GOPATH mode: Debian's sources, no module downloads
        GOPATH=f"{GOCODE}:{tmp / 'gopath'}",
        GOCACHE=str(tmp / "gocache"),
        GOFLAGS="",
        GOPROXY="off",
        CGO_ENABLED="0",
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=HERE / program,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        err = " ".join(proc.stderr.split())[:300]
        return None, f"building {program} failed ({err}): {what} skipped"
    version = subprocess.run([go, "version"], capture_output=True, text=True).stdout.split()
    return binary, f"{program} built in {time.perf_counter() - t0:.1f} s ({' '.join(version[2:3])})"
