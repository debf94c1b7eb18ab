"""A server process for the socket benchmarks: started, awaited, stopped.

grpc.py and concurrent.py each build their own command line (our server,
another checkout's, a Go proxy); starting it, waiting for its socket and
stopping it is the same for all of them.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


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
