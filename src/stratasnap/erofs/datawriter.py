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
Compressed images use :mod:`.compressed_writer` instead, with the same
buffers and writeback.
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
from .tree import Node

__all__ = ["BUFFER", "BUFFERS", "MAX_BLOCKS", "SMALL", "DataRegion", "Writeback"]

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


class Writeback:
    """Starts writeback of what was written to ``fd`` so far, without waiting for it.

    The final fsync then finds most of the data already on its way to the
    disk: the disk works while the tar is parsed instead of after.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._written_to = 0
        self._writeback_from = 0

    def wrote(self, end: int) -> None:
        """Bytes up to ``end`` were written."""
        self._written_to = max(self._written_to, end)
        if self._written_to - self._writeback_from >= WRITEBACK_EVERY:
            libc.sync_file_range(
                self._fd,
                ctypes.c_int64(self._writeback_from),
                ctypes.c_int64(self._written_to - self._writeback_from),
                _SYNC_FILE_RANGE_WRITE,
            )
            self._writeback_from = self._written_to


class _Writer:
    """The writer thread and its buffer pool."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(BUFFER))
        self._jobs: queue.Queue[_Write | _Copy | None] = queue.Queue()
        self.error: BaseException | None = None
        self._copy_range = True
        self._wrote = Writeback(fd).wrote
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

    def close(self) -> None:
        """Wait for every queued write; raise what went wrong in any of them."""
        self.stop()
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
                    else:
                        self._copy(*job[1:])
            except BaseException as exc:  # raised in the caller's thread by check()
                self.error = exc
            finally:
                if job[0] == "write":
                    self._free.put(job[1])

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
