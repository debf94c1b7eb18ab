"""Helpers that run a few lines of Python in a fresh, single-threaded interpreter.

Some system calls act on the whole process: ``unshare(CLONE_NEWUSER)``
refuses (EINVAL) a process with more than one thread, and ``chdir`` moves
every thread. A forked copy of this process is not a safe place for them:
libraries with fork handlers (gRPC) start their threads again in the child,
and a fork of a threaded process may hang on a lock that another thread
held at the time of the fork. A new interpreter started by exec has one
thread and nothing else, whatever the parent runs; that is what these
helpers are. They cost a Python start-up (about 15 ms), which is why only
rare paths (id-mapped mounts, compacted overlay mounts) use them.

The protocol is one line per step on the helper's stdout: the errno of the
step, ``0`` when it worked. The parent reads each line with a deadline, so a
helper that hangs fails the call with ETIMEDOUT instead of holding a
server worker forever, and it is killed.
"""

from __future__ import annotations

import errno
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence

from ._libc import StrPath, os_error

__all__ = ["HELPER_TIMEOUT_S", "Helper"]

#: Seconds a helper gets for each step (and to exit) before it is killed.
HELPER_TIMEOUT_S = 30.0

# Every helper script starts with libc at hand and a way to report a step.
_PRELUDE = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def report(ret):
    sys.stdout.write(f"{0 if ret == 0 else ctypes.get_errno() or 5}\\n")
    sys.stdout.flush()
"""


class Helper:
    """A running helper process; use it as a context manager so it always goes away.

    ``script`` sees ``libc`` (ctypes, errno kept), ``report(ret)`` and
    ``sys.argv[1:]`` = ``args``; it may wait for the parent by reading
    ``sys.stdin`` (closed by :meth:`close`).
    """

    def __init__(
        self,
        script: str,
        args: Sequence[str] = (),
        cwd: StrPath | None = None,
        timeout: float | None = None,
    ) -> None:
        self.timeout = HELPER_TIMEOUT_S if timeout is None else timeout
        # -I: no environment variables or user site; -S: no site-packages (only the stdlib).
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PRELUDE + script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            close_fds=True,
        )
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def expect_ok(self, what: str, path: StrPath | None = None) -> None:
        """Wait for the helper's next report; raise its errno as an OSError when not 0."""
        line = self._read_line(what, path)
        try:
            err = int(line)
        except ValueError:
            raise os_error(errno.EIO, path, f"{what}: helper said {line!r}") from None
        if err != 0:
            raise os_error(err, path, what)

    def _read_line(self, what: str, path: StrPath | None) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self._kill()
                    raise os_error(
                        errno.ETIMEDOUT, path, f"{what}: helper gave no answer in {self.timeout}s"
                    )
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise os_error(errno.EIO, path, f"{what}: helper died: {self._stderr()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace").strip()

    def _stderr(self) -> str:
        self._wait()
        assert self.proc.stderr is not None
        text = self.proc.stderr.read().decode(errors="replace").strip()
        return text.splitlines()[-1] if text else f"exit status {self.proc.returncode}"

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def _wait(self) -> None:
        try:
            self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self._kill()

    def close(self) -> None:
        """Let the helper go (its stdin closes) and reap it; kill it if it does not exit."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
