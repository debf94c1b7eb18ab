"""Compressed file data: 4 KiB physical clusters and their full lcluster index.

The layout (Documentation/filesystems/erofs.rst, fs/erofs/erofs_fs.h), kept
to what Linux has read since 5.3:

- A file is cut into *extents* of consecutive bytes. Each extent is stored in
  one physical block (a *pcluster* of one block: no BIG_PCLUSTER feature):
  either lz4-compressed, holding as much input as fits in 4096 bytes once
  compressed (fixed-output compression; right-aligned after zeros, the
  ZERO_PADDING feature), or raw, holding up to 4096 bytes as they are.
  An extent is compressed only when that saves space: it must hold more than a
  block of input. Hence every extent but the file's last covers more than
  4096 bytes (compressed) or exactly 4096 (raw), so no two extents start in the
  same 4 KiB *logical cluster* of the file.
- The index has one 8-byte entry per logical cluster (the FULL format, not the
  compacted one: simpler, and 0.2% of the file's size): HEAD (compressed) or
  PLAIN (raw) where an extent starts, with the offset of that start inside the
  cluster and the block; NONHEAD for a cluster inside an extent, with the
  distance back to its head (delta[0]) and ahead to the next head (delta[1]).
  A file ending inside a cluster no extent starts in gets a last PLAIN entry
  at the end offset (block 0), marking where the final extent stops.

A file whose every extent is raw needs none of this: its blocks are
contiguous and in order, so it is stored as a plain (FLAT_PLAIN) file instead,
with nothing to decode when it is read. Small files (4 KiB or less) never
compress (an extent still takes a block) and are plain as well.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from . import format as fmt
from .lz4 import Lz4
from .tree import Node

__all__ = ["WINDOW", "ClusterCompressor", "FileClusters", "Segment"]

BS = fmt.BLOCK_SIZE
# Input offered per extent. lz4's best ratio (about 255:1, for runs of zeros)
# fills a block from about 1 MiB, so this costs nothing on real data; it keeps
# an extent far below what kernels accept (12 MiB decoded since 6.12; a NONHEAD
# delta[0] below 2048 clusters, i.e. 8 MiB, without BIG_PCLUSTER).
WINDOW = 1 << 20
_ZEROS = bytes(BS)
_PLAIN, _HEAD, _NONHEAD = fmt.LCLUSTER_PLAIN, fmt.LCLUSTER_HEAD, fmt.LCLUSTER_NONHEAD
_HEAD_ENTRY = fmt.LCLUSTER_HEAD_INDEX.pack
_NONHEAD_ENTRY = fmt.LCLUSTER_NONHEAD_INDEX.pack


class FileClusters:
    """One file's extents so far, across the pieces its data arrives in."""

    __slots__ = ("blocks", "compressed", "first_block", "index", "node", "pos")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.pos = 0  # file bytes placed so far
        self.index = bytearray()
        self.first_block = 0
        self.blocks = 0
        self.compressed = 0  # extents stored compressed

    def extent(self, length: int, compressed: bool, blkaddr: int) -> None:
        """Record the next extent: ``length`` bytes in block ``blkaddr``."""
        start, end = self.pos, self.pos + length
        head = start // BS
        if len(self.index) != head * fmt.LCLUSTER_INDEX_SIZE:
            raise AssertionError("two extents start in one logical cluster")
        clusterofs = start % BS
        if compressed:
            self.index += _HEAD_ENTRY(_HEAD, clusterofs, blkaddr)
            self.compressed += 1
        else:
            self.index += _HEAD_ENTRY(_PLAIN, clusterofs, blkaddr)
        nxt = end // BS  # the cluster the next extent starts in
        for lcn in range(head + 1, nxt):
            self.index += _NONHEAD_ENTRY(_NONHEAD, 0, lcn - head, nxt - lcn)
        if not self.blocks:
            self.first_block = blkaddr
        self.blocks += 1
        self.pos = end

    def finish(self) -> None:
        """Give the node its data: a plain block run, or the index of its extents."""
        node = self.node
        if self.pos != node.size:
            raise AssertionError(f"placed {self.pos} of {node.size} bytes")
        if not self.compressed:
            # Raw extents of whole blocks from offset 0, in consecutive blocks: the
            # blocks hold the file as an uncompressed inode would.
            if self.blocks != -(-node.size // BS):
                raise AssertionError("raw extents that are not whole blocks")
            node.blkaddr = self.first_block if self.blocks else 0
            return
        if len(self.index) < -(-node.size // BS) * fmt.LCLUSTER_INDEX_SIZE:
            # The last extent ends inside a cluster it did not start in: mark its end.
            self.index += _HEAD_ENTRY(_PLAIN, node.size % BS, 0)
        node.zindex = bytes(self.index)
        node.blkaddr = self.blocks  # i_u of a compressed inode: blocks it takes

    def place(self, extents: list[int], first_block: int) -> None:
        """Record extents that :class:`ClusterCompressor` stored from ``first_block`` on."""
        for n, length in enumerate(extents):
            self.extent(abs(length), length > 0, first_block + n)


Segment = tuple[FileClusters, int, int, bool]  # file, offset in the buffer, length, last piece


class ClusterCompressor:
    """Compresses pieces of file data into consecutive 4 KiB blocks (one per thread).

    Pieces of one file come in order, and every piece but a file's last is a
    whole number of blocks long (so an extent never spans two pieces, and
    extents still start in distinct logical clusters). The blocks go to an
    output buffer at positions relative to its start: they get their place in
    the image later, in order (see :mod:`.compressed_writer`).
    """

    def __init__(self, codec: Lz4) -> None:
        self._codec = codec
        self._cbuf = bytearray(BS)  # one compressed block, before it is right-aligned
        self._cbuf_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._cbuf))

    def compress(
        self, buf: bytearray, segments: Sequence[Segment], out: bytearray
    ) -> tuple[int, list[list[int]]]:
        """Blocks written to ``out``, and per segment its extents in block order:
        the length stored, positive when compressed, negative when raw."""
        view = memoryview(buf)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        out_view = memoryview(out)
        blocks = 0
        extents = []
        for _file, start, length, _last in segments:
            done = self._piece(view[start : start + length], addr + start, out_view, blocks)
            blocks += len(done)
            extents.append(done)
        return blocks, extents

    def _piece(self, data: memoryview, addr: int, out: memoryview, block: int) -> list[int]:
        length, pos = len(data), 0
        cbuf, compress = memoryview(self._cbuf), self._codec.compress
        extents: list[int] = []
        o = block * BS
        while pos < length:
            left = length - pos
            if left > BS:
                consumed, size = compress(addr + pos, min(left, WINDOW), self._cbuf_addr, BS)
                if consumed > BS:
                    out[o : o + BS - size] = _ZEROS[: BS - size]
                    out[o + BS - size : o + BS] = cbuf[:size]
                    extents.append(consumed)
                    pos += consumed
                    o += BS
                    continue
            n = min(left, BS)
            out[o : o + n] = data[pos : pos + n]
            if n < BS:
                out[o + n : o + BS] = _ZEROS[: BS - n]
            extents.append(-n)
            pos += n
            o += BS
        return extents
