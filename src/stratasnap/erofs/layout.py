"""Metadata layout: inodes, directories, symlinks and shared xattrs after the data.

File data is streamed to the image first (block 1 on), so everything here is
placed after it, once the whole tar has been read::

    block 0          superblock at byte 1024 (written last)
    blocks 1..       regular-file data, each file in whole blocks (FLAT_PLAIN), or
                     one block per compressed extent (see pclusters.py)
    xattr_blkaddr    shared xattr entries
    meta_blkaddr     inodes, 32-byte slots (nid = slot number); the root first (nid 1)
                     so it fits the superblock's 16-bit root_nid
    after them       directory / symlink blocks that did not fit inline

An inode record (inode, xattr body, inline tail) never crosses a block
boundary: the kernel refuses inline data that does, and reads are simpler. A
compressed file's record (inode, xattrs, map header, one 8-byte index entry per
4 KiB of file) may: the kernel reads each entry on its own, and 8-byte entries
at 8-aligned offsets never straddle blocks. One over a block starts a block.
Directory blocks hold sorted entries so the kernel can binary-search them.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass

from ..tarstream import LayerTooLarge
from . import format as fmt
from .tree import Node
from .xattrs import SharedXattrs, encodable

__all__ = ["MetaResult", "write_metadata"]

BS = fmt.BLOCK_SIZE

_FTYPES = {
    stat.S_IFREG: fmt.FT_REG,
    stat.S_IFDIR: fmt.FT_DIR,
    stat.S_IFCHR: fmt.FT_CHR,
    stat.S_IFBLK: fmt.FT_BLK,
    stat.S_IFIFO: fmt.FT_FIFO,
    stat.S_IFSOCK: fmt.FT_SOCK,
    stat.S_IFLNK: fmt.FT_LNK,
}


@dataclass(frozen=True)
class MetaResult:
    blocks: int  # total image blocks
    inodes: int
    build_time: tuple[int, int]
    extended_inodes: int
    shared_xattrs: int
    dropped_xattrs: int
    compressed_files: int


def _pad_to(n: int, align: int) -> int:
    return n + (-n % align)


def _dir_payload(entries: list[tuple[bytes, int, int]]) -> bytes:
    """Directory blocks for sorted (name, nid, ftype) entries; the last block unpadded."""
    blocks: list[bytes] = []
    i, n = 0, len(entries)
    while i < n:
        j, used = i, 0
        while j < n and used + fmt.DIRENT_SIZE + len(entries[j][0]) <= BS:
            used += fmt.DIRENT_SIZE + len(entries[j][0])
            j += 1
        nameoff = fmt.DIRENT_SIZE * (j - i)
        heads = []
        for name, nid, ftype in entries[i:j]:
            heads.append(fmt.DIRENT.pack(nid, nameoff, ftype))
            nameoff += len(name)
        block = b"".join(heads) + b"".join(e[0] for e in entries[i:j])
        i = j
        # A full block's last name ends at a NUL or the block end; the last block ends at i_size.
        blocks.append(block if i == n else block.ljust(BS, b"\0"))
    return b"".join(blocks)


def _dir_size(d: Node) -> int:
    """The size ``_dir_payload`` will give ``d``: same greedy packing, names only."""
    assert d.children is not None
    size = used = 0
    for name in sorted([b".", b"..", *d.children]):
        need = fmt.DIRENT_SIZE + len(name)
        if used + need > BS:
            size += BS
            used = 0
        used += need
    return size + used


def _walk(root: Node) -> list[Node]:
    """The reachable inodes, depth first; sets each one's nlink, and dirs' parent."""
    root.nlink, root.parent = 2, root
    order = [root]
    stack = [root]
    while stack:
        d = stack.pop()
        assert d.children is not None
        for child in d.children.values():
            if child.children is not None:
                d.nlink += 1
                child.nlink, child.parent = 2, d
                order.append(child)
                stack.append(child)
            elif child.nlink:
                child.nlink += 1  # another hard link to an inode already placed
            else:
                child.nlink = 1
                order.append(child)
    return order


def _build_time(order: list[Node]) -> tuple[int, int]:
    # Compact inodes take their mtime from the superblock: use the commonest one
    # (counted on a sample, so that a layer of all-different times costs no memory).
    step = max(1, len(order) // 65536)
    counts = Counter((n.mtime, n.mtime_nsec) for n in order[::step])
    (sec, nsec), _ = counts.most_common(1)[0]
    return (sec, nsec) if sec >= 0 else (0, 0)


def write_metadata(
    fd: int, root: Node, first_block: int, uuid: bytes, volume_name: bytes = b""
) -> MetaResult:
    """Lay out and write all metadata and the superblock from ``first_block`` on.

    Regular files with a ``zindex`` become compressed inodes (FULL index);
    the superblock then announces ZERO_PADDING, which their blocks use.
    """
    order = _walk(root)
    build_time = _build_time(order)
    keys = [encodable(n.xattrs) if n.xattrs else None for n in order]
    dropped = sum(len(n.xattrs) for n in order) - sum(len(k) for k in keys if k)
    shared = SharedXattrs(k for k in keys if k)
    xattr_blkaddr = first_block
    meta_blkaddr = xattr_blkaddr + _pad_to(len(shared.area), BS) // BS

    # Pass 1: sizes and inode slots. A directory's size depends only on its names.
    # Per inode only what pass 2 cannot cheaply redo: the xattr body (rare) and
    # one flag byte (extended inode, inline tail).
    ibodies: dict[int, bytes] = {}
    flags = bytearray(len(order))
    # nid 0 would be inode number 0, which readdir(3) treats as a deleted entry.
    pos = fmt.INODE_SLOT
    extended = compressed = 0
    for i, node in enumerate(order):
        key = keys[i]
        ibody = shared.ibody(key) if key else b""
        if ibody:
            ibodies[i] = ibody
        if len(ibody) > fmt.XATTR_MAX_IBODY:
            raise LayerTooLarge("an inode's xattrs exceed what EROFS can hold")
        # Directories: their entries; symlinks: the target; others: nothing inline.
        payload_size = _dir_size(node) if node.children is not None else len(node.target)
        compact = (
            node.uid <= 0xFFFF
            and node.gid <= 0xFFFF
            and node.nlink <= 0xFFFF
            and max(node.size, payload_size) <= 0xFFFFFFFF
            and (node.mtime, node.mtime_nsec) == build_time
        )
        core = fmt.COMPACT_SIZE if compact else fmt.EXTENDED_SIZE
        extended += not compact
        if node.zindex is not None:
            compressed += 1
            inline = False
            record = fmt.z_index_offset(core + len(ibody)) + len(node.zindex)
        else:
            tail = payload_size % BS
            inline = bool(tail) and core + len(ibody) + tail <= BS
            record = core + len(ibody) + (tail if inline else 0)
        flags[i] = (not compact) | (inline << 1)
        if record > BS or pos % BS + record > BS:
            pos = _pad_to(pos, BS)
        node.nid = pos // fmt.INODE_SLOT
        pos = _pad_to(pos + record, fmt.INODE_SLOT)
    if root.nid > 0xFFFF:
        raise AssertionError("the root inode must fit the 16-bit root_nid")

    # Pass 2: directory/symlink blocks after the inodes, then serialise.
    inode_area = bytearray(_pad_to(pos, BS))
    extra = bytearray()
    next_block = meta_blkaddr + len(inode_area) // BS
    for i, node in enumerate(order):
        ibody = ibodies.get(i, b"")
        core = fmt.EXTENDED_SIZE if flags[i] & 1 else fmt.COMPACT_SIZE
        inline = bool(flags[i] & 2)
        off = node.nid * fmt.INODE_SLOT
        kind = stat.S_IFMT(node.mode)
        layout = fmt.LAYOUT_FLAT_PLAIN
        if kind == stat.S_IFREG:
            i_u, size = node.blkaddr, node.size
            if node.zindex is not None:
                layout = fmt.LAYOUT_COMPRESSED_FULL
                # The map header and its reserved bytes stay zero (see format.py).
                at = off + fmt.z_index_offset(core + len(ibody))
                inode_area[at : at + len(node.zindex)] = node.zindex
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            i_u, size = node.rdev, 0
        else:  # directories and symlinks: whole blocks out of line, the tail inline
            payload = _dir_payload(_dir_entries(node)) if node.children is not None else node.target
            size = len(payload)
            full = size - size % BS if inline else _pad_to(size, BS)
            i_u = 0
            if full:
                i_u = next_block + len(extra) // BS
                extra += payload[:full]
                extra += bytes(-len(extra) % BS)
            if inline:
                layout = fmt.LAYOUT_FLAT_INLINE
                tail_at = off + core + len(ibody)
                inode_area[tail_at : tail_at + size - full] = payload[full:]
        icount = fmt.xattr_icount(len(ibody)) if ibody else 0
        if core == fmt.COMPACT_SIZE:
            fmt.pack_compact_inode_into(
                inode_area,
                off,
                layout,
                icount,
                node.mode,
                node.nlink,
                size,
                i_u,
                i + 1,
                node.uid,
                node.gid,
            )
        else:
            fmt.pack_extended_inode_into(
                inode_area,
                off,
                layout,
                icount,
                node.mode,
                node.nlink,
                size,
                i_u,
                i + 1,
                node.uid,
                node.gid,
                node.mtime,
                node.mtime_nsec,
            )
        if ibody:
            inode_area[off + core : off + core + len(ibody)] = ibody

    if shared.area:
        os.pwrite(fd, shared.area, xattr_blkaddr * BS)
    os.pwrite(fd, inode_area, meta_blkaddr * BS)
    if extra:
        os.pwrite(fd, extra, next_block * BS)
    blocks = next_block + len(extra) // BS
    os.ftruncate(fd, blocks * BS)
    sb = fmt.pack_superblock(
        root_nid=root.nid,
        inos=len(order),
        build_time=build_time[0],
        build_time_nsec=build_time[1],
        blocks=blocks,
        meta_blkaddr=meta_blkaddr,
        xattr_blkaddr=xattr_blkaddr,
        uuid=uuid,
        volume_name=volume_name,
        feature_incompat=fmt.FEATURE_INCOMPAT_ZERO_PADDING if compressed else 0,
    )
    os.pwrite(fd, sb, fmt.SUPER_OFFSET)
    return MetaResult(
        blocks, len(order), build_time, extended, len(shared.ids), dropped, compressed
    )


def _dir_entries(d: Node) -> list[tuple[bytes, int, int]]:
    assert d.children is not None and d.parent is not None
    entries = [(b".", d.nid, fmt.FT_DIR), (b"..", d.parent.nid, fmt.FT_DIR)]
    entries += [(name, c.nid, _FTYPES[c.mode & 0o170000]) for name, c in d.children.items()]
    entries.sort()
    return entries
