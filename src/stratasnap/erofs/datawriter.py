"""File data into the image: block allocation, batching, and a writer thread.

Data is appended in whole blocks from block 1 on (block 0 holds the
superblock). Small files are read straight into a pooled buffer and written
together; a large file is copied inside the kernel (``copy_file_range``) when
the tar is a regular file, else read in buffer-sized pieces, and a piece that
is all zeros in whole MiB is left as a hole.

The writes themselves run on one background thread: ``pwrite`` and
``copy_file_range`` release the GIL, so the kernel's copying overlaps the
parsing of the next members. The thread is started and joined by
:class:`DataRegion`; an error it meets is raised in the caller at the next call.

:class:`CompressedRegion` is the same for compressed images: the main thread
reads file data into the pooled buffers, and the writer thread compresses it
(:mod:`.pclusters`; liblz4 releases the GIL too), allocates its blocks and
writes them. Blocks are allocated on that thread, in file order, so a file's
blocks are known only once :meth:`CompressedRegion.finish` has returned.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
from typing import Literal

from ..fs._libc import libc
from ..tarstream import LayerTooLarge, TarReader, TruncatedTar
from . import format as fmt
from .lz4 import Lz4
from .pclusters import ClusterPacker, FileClusters, Segment
from .tree import Node

__all__ = ["CompressedRegion", "DataRegion"]

BS = fmt.BLOCK_SIZE
BUFFER = 4 << 20  # one pooled buffer; small files are batched up to this size
BUFFERS = 4  # pooled buffers: one being filled, the others queued or being written
SMALL = 256 << 10  # files up to this size are batched
HOLE_UNIT = 1 << 20  # an all-zero run of this size (aligned) is not written
MAX_BLOCKS = 0xFFFFFFFF  # block addresses are 32-bit
WRITEBACK_EVERY = 32 << 20  # start the disk writing each time this much is written
_ZERO = bytes(HOLE_UNIT)
_SYNC_FILE_RANGE_WRITE = 2
_NO_COPY_RANGE = frozenset((errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))

_Write = tuple[Literal["write"], bytearray, int, int, bool]  # buffer, length, offset, holes
_Copy = tuple[Literal["copy"], int, int, int, int]  # src fd, src offset, length, offset
_Pack = tuple[Literal["pack"], bytearray, list[Segment]]  # buffer, file pieces in it


class _Writer:
    """The writer thread and its buffer pool (and, compressing, its cluster packer)."""

    def __init__(self, fd: int, codec: Lz4 | None = None) -> None:
        self._fd = fd
        self.packer = ClusterPacker(codec, 1, self._put) if codec else None
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(BUFFER))
        self._jobs: queue.Queue[_Write | _Copy | _Pack | None] = queue.Queue()
        self.error: BaseException | None = None
        self._copy_range = True
        self._written_to = 0
        self._writeback_from = 0
        self._thread = threading.Thread(target=self._run, name="erofs-writer", daemon=True)
        self._thread.start()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def take(self) -> bytearray:
        buf = self._free.get()
        self.check()
        return buf

    def write(self, buf: bytearray, length: int, offset: int, holes: bool) -> None:
        self._jobs.put(("write", buf, length, offset, holes))

    def copy(self, src_fd: int, src_offset: int, length: int, offset: int) -> None:
        self._jobs.put(("copy", src_fd, src_offset, length, offset))

    def pack(self, buf: bytearray, segments: list[Segment]) -> None:
        self._jobs.put(("pack", buf, segments))

    def close(self) -> None:
        """Wait for every queued write; raise what went wrong in any of them."""
        self.stop()
        if self.packer is not None and self.error is None:
            self.packer.flush()  # the thread is gone: its last staged blocks
        self.check()

    def stop(self, *, drop_queued: bool = False) -> None:
        """End the thread once it is idle; with ``drop_queued``, skip what is left."""
        if drop_queued and self.error is None:
            self.error = RuntimeError("data writes abandoned")
        self._jobs.put(None)
        self._thread.join()

    # -- the thread -------------------------------------------------------
    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self.error is None:
                    if job[0] == "write":
                        self._write(*job[1:])
                    elif job[0] == "copy":
                        self._copy(*job[1:])
                    else:
                        assert self.packer is not None
                        self.packer.pack(job[1], job[2])
            except BaseException as exc:  # raised in the caller's thread by check()
                self.error = exc
            finally:
                if job[0] != "copy":
                    self._free.put(job[1])

    def _put(self, data: memoryview, offset: int) -> None:
        os.pwrite(self._fd, data, offset)
        self._wrote(offset + len(data))

    def _write(self, buf: bytearray, length: int, offset: int, holes: bool) -> None:
        view = memoryview(buf)
        if not holes:
            os.pwrite(self._fd, view[:length], offset)
        else:
            for start in range(0, length, HOLE_UNIT):
                end = min(start + HOLE_UNIT, length)
                if end - start < HOLE_UNIT or buf[start:end] != _ZERO:
                    os.pwrite(self._fd, view[start:end], offset + start)
        self._wrote(offset + length)

    def _copy(self, src_fd: int, src_offset: int, length: int, offset: int) -> None:
        done = 0
        if self._copy_range:
            try:
                while done < length:
                    step = os.copy_file_range(
                        src_fd, self._fd, length - done, src_offset + done, offset + done
                    )
                    if step == 0:
                        break
                    done += step
            except OSError as exc:
                if done or exc.errno not in _NO_COPY_RANGE:
                    raise
                self._copy_range = False  # e.g. across filesystems: plain reads from now on
        while done < length:
            data = os.pread(src_fd, min(length - done, BUFFER), src_offset + done)
            if not data:
                raise TruncatedTar("the tar file shrank while it was read")
            os.pwrite(self._fd, data, offset + done)
            done += len(data)
        self._wrote(offset + length)

    def _wrote(self, end: int) -> None:
        """Start writeback of what was written so far, without waiting for it.

        The final fsync then finds most of the data already on its way to the
        disk: the disk works while the tar is parsed instead of after.
        """
        self._written_to = max(self._written_to, end)
        if self._written_to - self._writeback_from >= WRITEBACK_EVERY:
            libc.sync_file_range(
                self._fd,
                ctypes.c_int64(self._writeback_from),
                ctypes.c_int64(self._written_to - self._writeback_from),
                _SYNC_FILE_RANGE_WRITE,
            )
            self._writeback_from = self._written_to


class DataRegion:
    """Allocates blocks for file data and hands the bytes to the writer thread."""

    def __init__(self, fd: int) -> None:
        self.next_block = 1
        self.data_bytes = 0
        self._writer = _Writer(fd)
        self._buf = self._writer.take()
        self._fill = 0  # bytes of the batch in use
        self._batch_block = 1  # where the batch goes
        self._closed = False

    def _reserve(self, size: int) -> int:
        blkaddr = self.next_block
        self.next_block += -(-size // BS)
        if self.next_block > MAX_BLOCKS:
            raise LayerTooLarge("layer data exceeds the 16 TiB an EROFS image can address")
        self.data_bytes += size
        return blkaddr

    def _flush(self) -> None:
        if self._fill:
            self._writer.write(self._buf, self._fill, self._batch_block * BS, False)
            self._buf = self._writer.take()
            self._fill = 0
        self._batch_block = self.next_block

    def add(self, reader: TarReader, node: Node) -> None:
        """Store the current member's ``node.size`` data bytes; sets ``node.blkaddr``."""
        node.blkaddr = self._add(reader, node.size)

    def _add(self, reader: TarReader, size: int) -> int:
        if size == 0:
            return 0
        padded = size + (-size % BS)
        if padded <= SMALL:
            if self._fill + padded > BUFFER:
                self._flush()
            blkaddr = self._reserve(size)
            fill = self._fill
            view = memoryview(self._buf)
            # The tar's record padding (to 512) lands inside our block padding (to 4096)
            # and is zeroed with it: one read per small file.
            reader.readinto_padded(view[fill : fill + padded])
            view[fill + size : fill + padded] = _ZERO[: padded - size]
            self._fill = fill + padded
            return blkaddr
        self._flush()
        blkaddr = self._reserve(size)
        offset = blkaddr * BS
        span = reader.skip_in_file(size)
        if span is not None:
            self._writer.copy(span[0], span[1], size, offset)
        else:
            left = size
            while left:
                buf = self._writer.take()
                n = reader.readinto(memoryview(buf)[: min(left, BUFFER)])
                self._writer.write(buf, n, offset, True)
                offset += n
                left -= n
        self._batch_block = self.next_block
        return blkaddr

    def finish(self) -> None:
        """Write what is batched and wait for all writes (raising their errors)."""
        self._flush()
        self._closed = True
        self._writer.close()

    def abort(self) -> None:
        """Stop the writer thread, ignoring its errors (the image is being discarded)."""
        if not self._closed:
            self._closed = True
            self._writer.stop(drop_queued=True)


class CompressedRegion:
    """Like :class:`DataRegion`, with files compressed by ``codec`` on the writer thread.

    A file's node gets its block (or its index) once :meth:`finish` returns.
    """

    def __init__(self, fd: int, codec: Lz4) -> None:
        self.data_bytes = 0
        self._writer = _Writer(fd, codec)
        self._buf = self._writer.take()
        self._fill = 0
        self._segments: list[Segment] = []
        self._closed = False

    @property
    def next_block(self) -> int:
        """The first block after the data (once :meth:`finish` has returned)."""
        assert self._closed and self._writer.packer is not None
        return self._writer.packer.next_block

    def _flush(self) -> None:
        if self._segments:
            self._writer.pack(self._buf, self._segments)
            self._buf = self._writer.take()
            self._fill = 0
            self._segments = []

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
            buf = self._writer.take()
            n = reader.readinto(memoryview(buf)[: min(left, BUFFER)])
            left -= n
            self._writer.pack(buf, [(file, 0, n, not left)])

    def finish(self) -> None:
        """Compress and write what is queued, wait for it (raising its errors)."""
        self._flush()
        self._closed = True
        self._writer.close()

    def abort(self) -> None:
        """Stop the writer thread, ignoring its errors (the image is being discarded)."""
        if not self._closed:
            self._closed = True
            self._writer.stop(drop_queued=True)
