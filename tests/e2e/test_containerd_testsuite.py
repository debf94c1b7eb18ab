"""containerd's own snapshotter testsuite against stratasnap, through containerd's proxy client.

``tests/e2e/testsuite`` is a Go test that runs
``github.com/containerd/containerd/snapshots/testsuite`` (the tests every
containerd snapshotter passes: layers, views, permissions, renames, 128-layer
mounts, removes) with a fresh ``stratasnap serve`` per test. It is built
offline from Debian's Go sources (golang-go, golang-github-containerd-containerd-dev).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need, need_root

HERE = Path(__file__).parent / "testsuite"
GOCODE = Path("/usr/share/gocode")
SUITE_SRC = GOCODE / "src/github.com/containerd/containerd/snapshots/testsuite"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def suite_binary() -> Iterator[Path]:
    need_root()
    go = shutil.which("go")
    need(go is not None, "go not installed (apt-get install golang-go)")
    need(
        SUITE_SRC.is_dir(),
        "containerd's Go sources not installed"
        " (apt-get install golang-github-containerd-containerd-dev)",
    )
    assert go is not None
    with tempfile.TemporaryDirectory(prefix="stratasnap-testsuite-") as tmp:
        env = dict(os.environ)
        env.update(
            GO111MODULE="off",  # GOPATH mode: Debian's sources, nothing downloaded
            GOPATH=f"{GOCODE}:{tmp}/gopath",
            GOCACHE=f"{tmp}/gocache",
            GOFLAGS="",
            GOPROXY="off",
            CGO_ENABLED="0",
        )
        binary = Path(tmp) / "suite.test"
        built = subprocess.run(
            [go, "test", "-c", "-o", str(binary), "."],
            cwd=HERE,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert built.returncode == 0, built.stderr[-3000:]
        yield binary


@pytest.mark.parametrize("backend", ["native", "overlay", "blockfile"])
def test_containerd_snapshotter_testsuite(suite_binary: Path, scratch: Path, backend: str) -> None:
    env = dict(os.environ, STRATASNAP_PYTHON=sys.executable, STRATASNAP_BACKEND=backend)
    env["TMPDIR"] = str(scratch)  # the suite's roots: on the test's tmpfs
    run = subprocess.run(
        [str(suite_binary), "-test.root", "-test.v", "-test.timeout", "15m"],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    results = [line.strip() for line in run.stdout.splitlines() if line.strip().startswith("---")]
    failed = [line for line in results if line.startswith("--- FAIL")]
    assert run.returncode == 0 and not failed, "\n".join(failed) + "\n" + run.stdout[-4000:]
    # Every test of the suite ran (a skip is only for what the kernel cannot do).
    assert sum(line.startswith("--- PASS") for line in results) >= 19, results
