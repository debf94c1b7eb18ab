"""Build a Go program offline against Debian's packaged containerd sources (no pytest here).

GOPATH mode from ``/usr/share/gocode`` (``golang-github-containerd-containerd-dev``),
nothing downloaded. Used by the e2e tests (``gopull/``) and the benchmarks
(``benchmarks/_gobuild.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

__all__ = ["GOCODE", "GOPULL", "GO_CONTAINERD", "build_go"]

GOCODE = Path("/usr/share/gocode")
GO_CONTAINERD = GOCODE / "src/github.com/containerd/containerd"
#: The CRI-style puller (containerd's client.Pull with the remote-snapshot annotations).
GOPULL = Path(__file__).resolve().parent / "gopull"


def build_go(src: Path, binary: Path, tmp: Path) -> tuple[Path | None, str]:
    """Build the package in ``src`` into ``binary``: (binary, description) or (None, why not)."""
    go = shutil.which("go")
    if go is None or not GO_CONTAINERD.is_dir():
        missing = "go" if go is None else str(GO_CONTAINERD)
        return None, (
            f"no {missing} (apt-get install golang-go golang-github-containerd-containerd-dev)"
        )
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
        [go, "build", "-o", str(binary), "."], cwd=src, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        err = " ".join(proc.stderr.split())[:300]
        return None, f"building {src.name} failed ({err})"
    version = subprocess.run([go, "version"], capture_output=True, text=True).stdout.split()
    took = time.perf_counter() - t0
    return binary, f"{src.name} built in {took:.1f} s ({' '.join(version[2:3])})"
