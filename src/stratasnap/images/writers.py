"""Write new regular files from a few threads: the syscalls of creating a file (open, write,
fchown, fchmod, futimens, close) release the GIL, so they overlap with parsing the next
tar headers and with each other (measured: ``benchmarks/images.py``).

Only files whose data is already in memory go here, and only the common case: a
name that does not exist yet. A worker that finds the name taken (``EEXIST``)
hands the job back; the applier then waits for every job in flight
(:meth:`FileWriters.drain`) and handles it itself. The applier drains before
anything that removes or links (whiteouts, replacements, hard links) so that
the tar's order is kept wherever it matters.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FileJob", "FileWriters"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class FileJob:
    """One file to create: where, what, and the metadata calls it needs."""

    path: str
    data: bytes
    create_mode: int
    mtime_ns: int
    chown: tuple[int, int] | None = None
    chmod: int | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    rel: str = ""


class FileWriters:
    """A small pool of threads that create files; errors come back at :meth:`drain`."""

    def __init__(
        self,
        threads: int,
        set_xattr: Callable[[int, str, bytes], None],
        max_bytes: int = 64 << 20,
    ) -> None:
        self._q: queue.Queue[FileJob | None] = queue.Queue()
        self._set_xattr = set_xattr
        self._errors: list[tuple[FileJob, BaseException]] = []
        self._lock = threading.Lock()
        self._inflight = 0
        self._inflight_bytes = 0
        self._max_bytes = max_bytes
        self._idle = threading.Condition(self._lock)
        self.pending: set[str] = set()
        self._threads = [
            threading.Thread(target=self._work, name=f"layer-writer-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: FileJob) -> None:
        with self._idle:
            while self._inflight_bytes > self._max_bytes:
                self._idle.wait()
            self._inflight += 1
            self._inflight_bytes += len(job.data)
        self.pending.add(job.path)
        self._q.put(job)

    def _work(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                self._write(job)
            except BaseException as exc:
                with self._lock:
                    self._errors.append((job, exc))
            finally:
                with self._idle:
                    self._inflight -= 1
                    self._inflight_bytes -= len(job.data)
                    self._idle.notify_all()

    def write_here(self, job: FileJob) -> None:
        """Write ``job`` in the calling thread (a retry after its name was freed)."""
        self._write(job)

    def _write(self, job: FileJob) -> None:
        fd = os.open(job.path, _FLAGS, job.create_mode)
        try:
            view = memoryview(job.data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if job.chown is not None:
                try:
                    os.fchown(fd, *job.chown)
                except PermissionError:
                    if os.geteuid() == 0:
                        raise
            for key, value in job.xattrs.items():
                self._set_xattr(fd, key, value)
            if job.chmod is not None:
                os.fchmod(fd, job.chmod)
            os.utime(fd, ns=(job.mtime_ns, job.mtime_ns))
        finally:
            os.close(fd)

    def drain(self) -> list[tuple[FileJob, BaseException]]:
        """Wait until every submitted file is written; return the jobs that failed.

        A job that failed with EEXIST is returned for the caller to redo; any other
        error is raised (the first one).
        """
        with self._idle:
            while self._inflight:
                self._idle.wait()
            errors, self._errors = self._errors, []
        self.pending.clear()
        retry: list[tuple[FileJob, BaseException]] = []
        for job, exc in errors:
            if isinstance(exc, OSError) and exc.errno == errno.EEXIST:
                retry.append((job, exc))
            else:
                raise exc
        return retry

    def close(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
