"""The reaper: deletes the storage of removed snapshots off the caller's path.

Remove is two-phase (see :mod:`.snapshotter`): inside the metadata
transaction the storage is renamed ``<id>`` -> ``rm-<id>``, and only after
the commit is it deleted. Deleting a big tree can take seconds, so a backend
may leave that second phase to a reaper instead of doing it inside Remove.
A reaper is handed the ``rm-*`` paths and deletes them:

- in a background thread once :meth:`Reaper.start` was called (the server),
  so the space comes back moments after Remove returned;
- otherwise at :meth:`Reaper.drain` (``close()`` of the snapshotter, so the
  CLI's ``rm`` deletes before the process exits).

Nothing here must survive a crash: an ``rm-*`` directory that a killed
process did not get to is found again when the next process opens the root
(and by ``cleanup()``), so the reaper keeps no durable state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

__all__ = ["Reaper"]

log = logging.getLogger("stratasnap.reaper")


class Reaper:
    """Deletes queued paths with ``delete`` (False: "still mounted, leave it").

    ``delete`` must tolerate a path that is already gone (a concurrent
    cleanup() may take it first) and may raise OSError; a path it fails on
    is logged and left for cleanup(), never retried in a loop.
    """

    def __init__(self, delete: Callable[[Path], bool], name: str = "stratasnap-reaper") -> None:
        self._delete = delete
        self._name = name
        self._queue: deque[Path] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = 0  # paths taken off the queue and being deleted now
        #: How many paths were deleted, and how many were left for cleanup().
        self.reaped = 0
        self.failed = 0

    # -- feeding -------------------------------------------------------------------

    def submit(self, path: Path) -> None:
        """Queue ``path`` for deletion (the background thread wakes up, if running)."""
        with self._cond:
            self._queue.append(path)
            self._cond.notify()

    @property
    def pending(self) -> int:
        """Paths queued or being deleted now."""
        with self._cond:
            return len(self._queue) + self._busy

    # -- running ---------------------------------------------------------------------

    def start(self) -> None:
        """Delete in a background daemon thread from now on (idempotent)."""
        with self._cond:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or being deleted; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def flush(self, timeout: float = 60.0) -> bool:
        """Finish what is queued now, whoever deletes it; True if anything was queued.

        With the background thread running this waits for it (at most
        ``timeout`` seconds); without it, the queued paths are deleted here.
        For a caller that found the disk full: removed storage may be what
        gives the room back.
        """
        if not self.pending:
            return False
        if self.running:
            self.wait_idle(timeout)
        else:
            self._reap_queued()
        return True

    def drain(self) -> None:
        """Stop the background thread (after the path it is on), then delete the rest here."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._reap_queued()

    # -- internals -------------------------------------------------------------------

    def _take(self, block: bool) -> Path | None:
        with self._cond:
            while not self._queue:
                if not block or self._stopping:
                    return None
                self._cond.wait()
            if block and self._stopping:
                return None  # drain() deletes what is left, in its own thread
            self._busy += 1
            return self._queue.popleft()

    def _reap_queued(self) -> None:
        """Delete what is queued, in the calling thread."""
        while (path := self._take(block=False)) is not None:
            self._reap(path)

    def _run(self) -> None:
        while (path := self._take(block=True)) is not None:
            self._reap(path)

    def _reap(self, path: Path) -> None:
        try:
            if self._delete(path):
                self.reaped += 1
                log.debug("reaped removed storage", extra={"path": str(path)})
            else:
                self.failed += 1
                log.warning(
                    "removed storage still mounted or in use; left for cleanup",
                    extra={"path": str(path)},
                )
        except Exception as exc:  # a reaper that dies would leak every later remove
            self.failed += 1
            log.warning(
                "cannot delete removed storage; left for cleanup",
                extra={"path": str(path), "error": exc},
            )
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()
