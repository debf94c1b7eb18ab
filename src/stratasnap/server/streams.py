"""Send deadlines for server streams: a client that stops reading is cut off.

grpcio's sync server sends a streamed message from the worker thread that
produced it and blocks that thread until the client's flow-control window has
room. A client that starts a List and never reads would hold a worker for
ever. :class:`StreamWatch` notes when each stream last got a message out; one
watcher thread cancels the streams that made no progress for ``timeout``
seconds, which fails their blocked send and gives the worker back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Stream", "StreamWatch"]

log = logging.getLogger("stratasnap.server")


class Stream:
    """One watched stream: call :meth:`progress` after every message it sends."""

    __slots__ = ("_cancel", "last")

    def __init__(self, cancel: Callable[[], object]) -> None:
        self._cancel = cancel
        self.last = time.monotonic()

    def progress(self) -> None:
        self.last = time.monotonic()


class StreamWatch:
    """Cancels streams whose last message went out more than ``timeout`` s ago."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._streams: set[Stream] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, cancel: Callable[[], object]) -> Stream:
        """Start watching a stream; ``cancel`` ends it (``grpc.ServicerContext.cancel``)."""
        stream = Stream(cancel)
        with self._lock:
            self._streams.add(stream)
            if self._thread is None and not self._closed:
                # Started on first use: a server that is never listed costs no thread.
                self._thread = threading.Thread(
                    target=self._run, name="stratasnap-streams", daemon=True
                )
                self._thread.start()
        return stream

    def done(self, stream: Stream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        # Checking a few times per timeout bounds how late a stalled stream is
        # cut (timeout * 1.25) at the cost of a wake-up per interval.
        interval = max(self.timeout / 4, 0.05)
        while True:
            with self._lock:
                if self._closed:
                    return
                self._wake.wait(interval)
                if self._closed:
                    return
                now = time.monotonic()
                stalled = [s for s in self._streams if now - s.last > self.timeout]
                for stream in stalled:
                    self._streams.discard(stream)
            for stream in stalled:
                log.warning(
                    "stream cancelled: the client read nothing for too long",
                    extra={"send_timeout_s": self.timeout},
                )
                stream._cancel()
