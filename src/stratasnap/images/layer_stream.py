"""A layer blob read as verified, uncompressed bytes, decompressed in a second thread.

The producer thread reads the compressed blob, hashes it (the layer digest),
decompresses it and hashes the result (the diff ID), and hands chunks over
a bounded queue; the consumer (the tar applier) reads them as a file. zlib,
ISA-L, zstd and hashlib release the GIL on large buffers, so decompression
really overlaps with applying. :meth:`LayerStream.finish` drains what the
applier did not read (tar padding), then checks both digests.

A reader that hashes every byte it takes anyway (the erofs converter, which
returns the diff ID of what it read) passes ``hash_diff_id=False``: the
caller then compares that result with the config's (or, on containerd's
fast path, which knows no diff ID beforehand, ``diff_id=None``, with the
chain ID), and the uncompressed layer is hashed once, not twice.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from .compression import DecompressingReader
from .content import DigestMismatch
from .reference import Digest

__all__ = ["LayerStream"]

_CHUNK = 1 << 20
_DEPTH = 8


class _Hashing(io.RawIOBase):
    """Reads ``src`` and hashes what passes (and reports progress)."""

    def __init__(self, src: BinaryIO, hasher: Any, progress: Callable[[int], None] | None) -> None:
        super().__init__()
        self._src = src
        self.hasher = hasher
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n: int = self._src.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self.hasher.update(memoryview(buffer)[:n])
            if self._progress:
                self._progress(n)
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        if data:
            self.hasher.update(data)
            if self._progress:
                self._progress(len(data))
        return data


class LayerStream(io.RawIOBase):
    """The uncompressed bytes of one layer blob; :meth:`finish` verifies both digests."""

    def __init__(
        self,
        src: BinaryIO,
        compression: str,
        digest: Digest,
        diff_id: Digest | None,
        progress: Callable[[int], None] | None = None,
        *,
        hash_diff_id: bool = True,
    ) -> None:
        super().__init__()
        self.digest = digest
        self.diff_id = diff_id
        self._compressed = _Hashing(src, digest.hasher(), progress)
        self._reader = DecompressingReader(
            self._compressed,  # type: ignore[arg-type]
            compression,
            what=f"layer {digest}",
        )
        self._diff_hash = diff_id.hasher() if hash_diff_id and diff_id is not None else None
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(_DEPTH)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._eof = False
        #: Seconds the producer spent reading, decompressing and hashing.
        self.decompress_seconds = 0.0
        self.size = 0
        self._thread = threading.Thread(target=self._produce, name="layer-decompress", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            start = time.perf_counter()
            while not self._stop.is_set():
                chunk = self._reader.read(_CHUNK)
                if not chunk:
                    break
                if self._diff_hash is not None:
                    self._diff_hash.update(chunk)
                self.size += len(chunk)
                self.decompress_seconds += time.perf_counter() - start
                self._put(chunk)
                start = time.perf_counter()
            self._put(None)
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._buf:
            if self._eof:
                return 0
            item = self._queue.get()
            if item is None:
                self._eof = True
                return 0
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            self._buf = memoryview(item)
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def finish(self) -> None:
        """Read what is left, then check the blob digest and the diff ID (if hashed)."""
        if self._stop.is_set():
            raise RuntimeError("LayerStream.finish() after close()")
        while self.read(_CHUNK):
            pass
        self._thread.join()
        got = f"{self.digest.algorithm}:{self._compressed.hasher.hexdigest()}"
        if got != str(self.digest):
            raise DigestMismatch(f"layer blob {self.digest}: content has digest {got}")
        if self._diff_hash is None or self.diff_id is None:
            return
        got = f"{self.diff_id.algorithm}:{self._diff_hash.hexdigest()}"
        if got != str(self.diff_id):
            raise DigestMismatch(
                f"layer {self.digest}: uncompressed content has diff ID {got}, "
                f"the image config says {self.diff_id}"
            )

    def close(self) -> None:
        """Stop the producer (if still running) and release it."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        super().close()
