"""The content store: blobs by digest under ``<root>/content/``.

::

    content/blobs/<algorithm>/<hex>       verified blobs, read-only (0444)
    content/ingest/<algorithm>-<hex>      a blob being written (resumable), flock'ed

A blob is hashed while it is written and renamed into ``blobs/`` only after
its size and digest matched and its data and directory entry were fsynced:
a killed writer leaves at most a partial file under ``ingest/``, which the
next writer of the same digest resumes (the bytes it has are re-hashed) or
restarts. No file under ``blobs/`` ever claims a digest it does not have.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from ..errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable, from_os_error
from ..fs.usage import fsync_path
from ..types import Reclaimed
from .reference import Digest, parse_digest

__all__ = ["BlobWriter", "ContentStore", "DigestMismatch"]

_CHUNK = 1 << 20
#: How long a writer waits for another process writing the same blob.
_WAIT_FOR_WRITER_S = 600.0


class DigestMismatch(InvalidArgument):
    """A blob's bytes do not have the digest (or size) they were announced with."""


class ContentStore:
    """Blobs by digest, shared by every image of one stratasnap root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.ingest = self.root / "ingest"
        for d in (self.root, self.blobs, self.ingest):
            d.mkdir(mode=0o700, exist_ok=True)

    def path(self, digest: Digest | str) -> Path:
        d = parse_digest(digest) if isinstance(digest, str) else digest
        return self.blobs / d.algorithm / d.hex

    def has(self, digest: Digest | str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: Digest | str) -> int:
        """The size of a stored blob; NotFound when it is not stored."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest}") from None

    def open(self, digest: Digest | str) -> BinaryIO:
        """A stored blob, opened for reading; NotFound when it is not stored."""
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest}") from None

    def read(self, digest: Digest | str, limit: int = 16 << 20) -> bytes:
        """A small stored blob (a manifest, a config) whole; refuses ones past ``limit``."""
        with self.open(digest) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidArgument(f"blob {digest} is larger than {limit} bytes")
        return data

    def writer(self, digest: Digest | str, size: int | None = None) -> BlobWriter:
        """A writer for blob ``digest`` (resuming a partial one); see :class:`BlobWriter`."""
        d = parse_digest(digest) if isinstance(digest, str) else digest
        return BlobWriter(self, d, size)

    def put(self, data: bytes, digest: Digest | str | None = None) -> Digest:
        """Store ``data`` (checked against ``digest`` when given); returns its digest."""
        d = Digest.of(data) if digest is None else digest
        if self.has(d):
            return d if isinstance(d, Digest) else parse_digest(d)
        with self.writer(d, len(data)) as w:
            w.restart()
            w.write(data)
        return w.digest

    def put_stream(self, src: BinaryIO, digest: Digest | str, size: int | None = None) -> Digest:
        """Store the blob read from ``src`` (checked against ``digest`` and ``size``)."""
        if self.has(digest):
            return digest if isinstance(digest, Digest) else parse_digest(digest)
        with self.writer(digest, size) as w:
            w.restart()
            while chunk := src.read(_CHUNK):
                w.write(chunk)
        return w.digest

    def put_unknown(
        self, src: BinaryIO, progress: Callable[[int], None] | None = None
    ) -> tuple[Digest, int]:
        """Store a blob whose digest is not known in advance; returns (digest, size)."""
        tmp = self.ingest / f"unknown-{uuid.uuid4().hex}"
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if progress:
                        progress(len(chunk))
                out.flush()
                os.fchmod(out.fileno(), 0o444)
                os.fsync(out.fileno())
            digest = Digest("sha256", hasher.hexdigest())
            final = self.path(digest)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(tmp, final)
            fsync_path(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise from_os_error(exc, "storing a blob") from exc
        return digest, size

    def digests(self) -> Iterator[Digest]:
        """Every stored blob's digest."""
        for alg_dir in self.blobs.iterdir():
            with os.scandir(alg_dir) as it:
                names = [entry.name for entry in it]
            for name in names:
                yield Digest(alg_dir.name, name)

    def gc(self, keep: Iterable[Digest | str]) -> Reclaimed:
        """Delete every stored blob not in ``keep``, and partial blobs no writer holds."""
        kept = {str(k) for k in keep}
        paths: list[str] = []
        total = 0
        for d in list(self.digests()):
            if str(d) in kept:
                continue
            p = self.path(d)
            with suppress(FileNotFoundError):
                total += p.stat().st_size
                p.unlink()
                paths.append(str(p))
        with os.scandir(self.ingest) as it:
            partials = [Path(entry.path) for entry in it]
        paths.extend(str(p) for p in partials if _unlink_if_unlocked(p))
        return Reclaimed(paths=tuple(paths), size=total)


def _unlink_if_unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a writer is still at it
    else:
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


class BlobWriter:
    """Writes one blob: hashed while written, committed only when it verifies.

    ``offset`` is how many bytes a partial file from an earlier, interrupted
    writer already holds (already hashed): a source that can resume (an HTTP
    Range request) continues from there; one that cannot calls
    :meth:`restart`. Leaving the ``with`` block normally commits; an exception
    keeps the partial file for the next writer, except a digest mismatch,
    which deletes it.
    """

    def __init__(self, store: ContentStore, digest: Digest, size: int | None) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.partial = store.ingest / f"{digest.algorithm}-{digest.hex}"
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._hash = digest.hasher()
        self.offset = 0
        #: Another writer stored the blob while this one waited: nothing to write.
        self.already_stored = False
        self._lock_partial()
        if not self.already_stored and store.has(digest):
            # Stored by a writer that finished before this one created its partial.
            self.already_stored = True
            self._discard()
        if not self.already_stored:
            self._resume()

    def _lock_partial(self) -> None:
        """Lock the live partial file, waiting while another process writes the blob.

        When that writer finishes, the file this one opened has become the stored blob:
        then there is nothing to write (``already_stored``).
        """
        deadline = time.monotonic() + _WAIT_FOR_WRITER_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.close()
                    raise Unavailable(
                        f"blob {self.digest} has been written by another stratasnap process "
                        f"for over {_WAIT_FOR_WRITER_S:.0f} s; try again later"
                    ) from None
                time.sleep(0.05)
                continue
            mine = os.fstat(self._fd)
            try:
                live = os.stat(self.partial)
            except FileNotFoundError:
                live = None
            if live is not None and (live.st_dev, live.st_ino) == (mine.st_dev, mine.st_ino):
                return
            self.close()  # the other writer moved it into place (or gave it up)
            if self.store.has(self.digest):
                self.already_stored = True
                return
            self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _resume(self) -> None:
        end = os.lseek(self._fd, 0, os.SEEK_END)
        if self.size is not None and end > self.size:
            self.restart()
            return
        os.lseek(self._fd, 0, os.SEEK_SET)
        while chunk := os.read(self._fd, _CHUNK):
            self._hash.update(chunk)
            self.offset += len(chunk)

    def restart(self) -> None:
        """Forget what a partial file held and start from byte 0."""
        if self.already_stored:
            return
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hash = self.digest.hasher()
        self.offset = 0

    def write(self, data: bytes | memoryview) -> None:
        if self.already_stored:
            return
        if self.size is not None and self.offset + len(data) > self.size:
            self._discard()
            raise DigestMismatch(f"blob {self.digest}: more than the announced {self.size} bytes")
        self._hash.update(data)
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            raise from_os_error(exc, f"writing blob {self.digest}") from exc
        self.offset += len(data)

    def commit(self) -> None:
        """Verify size and digest, make the blob durable and move it into place."""
        if self.already_stored:
            return
        if self.size is not None and self.offset != self.size:
            self._discard()
            raise DigestMismatch(
                f"blob {self.digest}: got {self.offset} bytes, expected {self.size}"
            )
        got = self._hash.hexdigest()
        if got != self.digest.hex:
            self._discard()
            raise DigestMismatch(
                f"blob {self.digest}: content has digest {self.digest.algorithm}:{got}"
            )
        final = self.store.path(self.digest)
        try:
            os.fchmod(self._fd, 0o444)
            os.fsync(self._fd)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(self.partial, final)
            fsync_path(final.parent)
        except OSError as exc:
            raise from_os_error(exc, f"storing blob {self.digest}") from exc

    def _discard(self) -> None:
        if self._fd < 0:
            return  # only the holder of the lock may delete the partial file
        with suppress(OSError):
            self.partial.unlink()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.commit()
            elif isinstance(exc, ResourceExhausted):
                self._discard()  # a full disk: do not keep the partial blob around
        finally:
            self.close()
