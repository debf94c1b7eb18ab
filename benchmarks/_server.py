"""A server process for the socket benchmarks: started, awaited, stopped.

grpc.py, concurrent.py and chain.py each serve a store (our server, another
checkout's, a Go proxy); starting it, waiting for its socket and stopping it
is the same for all of them. :class:`Server` builds the command line for a
snapshots server from a ``src`` directory or the ``goproxy`` binary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _gobuild import build_go


class ServerProcess:
    """``argv`` as a subprocess, its output in ``log``, ready once ``address`` exists."""

    def __init__(
        self,
        argv: list[str],
        address: Path,
        log: Path,
        *,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
        poll: float = 0.02,
    ) -> None:
        self.address = address
        self.log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not address.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server did not start:\n{log.read_text()}")
            time.sleep(poll)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Server(ServerProcess):
    """A snapshots server on ``root``: ``python -m stratasnap.server serve`` from ``src``
    (``extra``: more of its flags), or, when ``src`` is a ``goproxy`` binary,
    containerd's overlay snapshotter. Its socket is ``<root>.sock``."""

    def __init__(
        self, src: Path, backend: str, root: Path, log: Path, extra: Sequence[str] = ()
    ) -> None:
        address = root.parent / f"{root.name}.sock"
        if src.name == "goproxy":
            argv = [str(src), "-root", str(root), "-address", str(address)]
        else:
            argv = [sys.executable, "-m", "stratasnap.server", "serve", "--root", str(root)]
            argv += ["--backend", backend, "--address", str(address)]
            argv += ["--log-level", "warning", *extra]
        env = {**os.environ, "PYTHONPATH": str(src)}
        super().__init__(argv, address, log, env=env, timeout=60, poll=0.05)


def built(program: str, out: Path, script: str) -> Path:
    """``goclient`` or ``goproxy``, built offline; exits saying why when it cannot be."""
    binary, note = build_go(program, out, f"{script} with {program}")
    if binary is None:
        raise SystemExit(note)
    return binary
