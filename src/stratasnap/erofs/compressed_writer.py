"""File data of compressed images: compressed on worker threads, placed in order.

The main thread reads each regular file's data into pooled buffers (small
files batched, a large file in 4 MiB pieces) and queues them as numbered jobs.
Worker threads (two where two CPUs are there: liblz4 releases the GIL, so they
compress side by side) turn a job into 4 KiB blocks in an output buffer of
their own (:class:`.pclusters.ClusterCompressor`). Blocks get their place in
the image in job order, whichever thread finishes first: each file's blocks
are contiguous and the same tar always gives the same image. The thread that
finishes job k places every finished job from k on: writes its blocks after
the previous ones and records the extents in its files' indexes.

Memory is bounded by the pools: 4 input and threads + 1 output buffers.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from ..tarstream import LayerTooLarge, TarReader
from . import format as fmt
from .datawriter import BUFFER, BUFFERS, MAX_BLOCKS, SMALL, Writeback
from .lz4 import Lz4
from .pclusters import ClusterCompressor, FileClusters, Segment
from .tree import Node

__all__ = ["THREADS", "CompressedRegion"]

BS = fmt.BLOCK_SIZE
THREADS = max(1, min(2, len(os.sched_getaffinity(0))))

_Job = tuple[int, bytearray, list[Segment]]  # number, input buffer, file pieces in it
# What a worker made of a job: its pieces, blocks used, extents per piece, the output
# buffer; None when it was skipped after an error.
_Done = tuple[list[Segment], int, list[list[int]], bytearray] | None


class CompressedRegion:
    """Like :class:`.datawriter.DataRegion`, with file data compressed by ``make_codec()``s.

    A file's node gets its block (or its index) once :meth:`finish` returns.
    """

    def __init__(self, fd: int, make_codec: Callable[[], Lz4], threads: int | None = None) -> None:
        threads = threads or THREADS
        self.data_bytes = 0
        self._next_block = 1  # the first block after the data placed so far
        self._fd = fd
        self._writeback = Writeback(fd)
        self.error: BaseException | None = None
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(BUFFER))
        # A job's output never exceeds its input: every piece is at most BUFFER long
        # and small files sit block-aligned in their batch, each extent one block.
        self._outputs: queue.Queue[bytearray] = queue.Queue()
        for _ in range(threads + 1):
            self._outputs.put(bytearray(BUFFER))
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        # A worker takes a job and an output buffer together: the lowest job being
        # worked on always has its buffer, so placing in order cannot deadlock.
        self._take_lock = threading.Lock()
        self._place_lock = threading.Lock()
        self._finished: dict[int, _Done] = {}  # done, waiting for an earlier job
        self._submitted = self._placed = 0
        codecs = [make_codec() for _ in range(threads)]  # fails here, before any thread
        self._threads = [
            threading.Thread(target=self._run, args=(c,), name="erofs-compress", daemon=True)
            for c in codecs
        ]
        for t in self._threads:
            t.start()
        self._buf = self._take()
        self._fill = 0
        self._segments: list[Segment] = []
        self._closed = False

    @property
    def next_block(self) -> int:
        """The first block after the data (once :meth:`finish` has returned)."""
        assert self._closed
        return self._next_block

    # -- the main thread -----------------------------------------------------
    def add(self, reader: TarReader, node: Node) -> None:
        """Queue the current member's ``node.size`` data bytes for compression."""
        size = node.size
        if size == 0:
            return
        self.data_bytes += size
        file = FileClusters(node)
        padded = size + (-size % BS)
        if padded <= SMALL:
            if self._fill + padded > BUFFER:
                self._flush()
            fill = self._fill
            reader.readinto_padded(memoryview(self._buf)[fill : fill + padded])
            self._segments.append((file, fill, size, True))
            self._fill = fill + padded
            return
        self._flush()
        left = size
        while left:  # BUFFER is whole blocks: every piece but the last is too
            buf = self._take()
            n = reader.readinto(memoryview(buf)[: min(left, BUFFER)])
            left -= n
            self._submit(buf, [(file, 0, n, not left)])

    def finish(self) -> None:
        """Compress, place and write what is queued; raise what went wrong."""
        self._flush()
        self._closed = True
        self._stop()
        if self.error is not None:
            raise self.error
        assert self._placed == self._submitted and not self._finished

    def abort(self) -> None:
        """Stop the workers, skipping what is queued (the image is being discarded)."""
        if not self._closed:
            self._closed = True
            if self.error is None:
                self.error = RuntimeError("compression abandoned")
            self._stop()

    def _take(self) -> bytearray:
        buf = self._free.get()
        if self.error is not None:
            raise self.error
        return buf

    def _submit(self, buf: bytearray, segments: list[Segment]) -> None:
        self._jobs.put((self._submitted, buf, segments))
        self._submitted += 1

    def _flush(self) -> None:
        if self._segments:
            self._submit(self._buf, self._segments)
            self._buf = self._take()
            self._fill = 0
            self._segments = []

    def _stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()

    # -- the workers -----------------------------------------------------------
    def _run(self, codec: Lz4) -> None:
        compressor = ClusterCompressor(codec)
        while True:
            with self._take_lock:
                job = self._jobs.get()
                if job is None:
                    return
                out = self._outputs.get()
            number, buf, segments = job
            done: _Done = None
            try:
                if self.error is None:
                    blocks, extents = compressor.compress(buf, segments, out)
                    done = (segments, blocks, extents, out)
            except BaseException as exc:  # raised in the main thread by _take()/finish()
                self.error = exc
            finally:
                self._free.put(buf)
            if done is None:
                self._outputs.put(out)
            self._place(number, done)

    def _place(self, number: int, done: _Done) -> None:
        with self._place_lock:
            self._finished[number] = done
            while self._placed in self._finished:
                ready = self._finished.pop(self._placed)
                self._placed += 1
                if ready is None:
                    continue
                try:
                    if self.error is None:
                        self._write(*ready)
                except BaseException as exc:
                    self.error = exc
                finally:
                    self._outputs.put(ready[3])

    def _write(
        self, segments: list[Segment], blocks: int, extents: list[list[int]], out: bytearray
    ) -> None:
        first = self._next_block
        if first + blocks > MAX_BLOCKS:
            raise LayerTooLarge("layer data exceeds the 16 TiB an EROFS image can address")
        os.pwrite(self._fd, memoryview(out)[: blocks * BS], first * BS)
        self._writeback.wrote((first + blocks) * BS)
        self._next_block = first + blocks
        for (file, _start, _length, last), piece in zip(segments, extents, strict=True):
            file.place(piece, first)
            first += len(piece)
            if last:
                file.finish()
