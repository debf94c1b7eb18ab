"""`stratasnap serve` through the installed command: starts, answers, stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stratasnap.server.client import Client

STRATASNAP = str(Path(sys.executable).parent / "stratasnap")


def test_serve_answers_and_stops_on_sigterm(scratch: Path) -> None:
    sock = scratch / "s.sock"
    proc = subprocess.Popen(
        [STRATASNAP, "--root", str(scratch / "root"), "serve", "--address", str(sock)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "server did not create its socket"
            time.sleep(0.05)
        assert oct(os.stat(sock).st_mode & 0o777) == oct(0o600)
        with Client(str(sock)) as client:
            client.prepare("a", labels={"k": "v"})
            client.commit("c", "a")
            assert client.stat("c").parent == ""
            assert [i.name for i in client.walk()] == ["c"]
        # The CLI on the same root sees what the server stored.
        out = subprocess.run(
            [STRATASNAP, "--root", str(scratch / "root"), "ls"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "c" in out.split()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not sock.exists(), "the socket is removed on shutdown"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
