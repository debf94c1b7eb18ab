"""EROFS on-disk constants and record packers.

Learned from the kernel's Documentation/filesystems/erofs.rst and the
structures of fs/erofs/erofs_fs.h; every integer on disk is little-endian.
Only what the converter writes is here: the superblock, the 32- and 64-byte
inodes, the xattr body and entries, directory entries, and for compressed
files the map header and the full (8-byte) logical-cluster index.
"""

from __future__ import annotations

import struct

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS  # 4 KiB: the one block size every kernel mounts (<= PAGE_SIZE)
SUPER_OFFSET = 1024  # the superblock sits 1 KiB into block 0 (room for boot sectors)
MAGIC = 0xE0F5E1E2

# Inode data layouts (bits 1-3 of i_format); bit 0 is the inode version.
LAYOUT_FLAT_PLAIN = 0  # data in contiguous whole blocks at raw_blkaddr
LAYOUT_FLAT_INLINE = 2  # whole blocks at raw_blkaddr, the tail right after the inode
LAYOUT_COMPRESSED_FULL = 1  # compressed: one 8-byte index per 4 KiB of file after the inode
INODE_COMPACT = 0  # 32 bytes: 16-bit ids/nlink, 32-bit size, mtime = superblock build time
INODE_EXTENDED = 1  # 64 bytes: 32-bit ids/nlink, 64-bit size, own mtime
COMPACT_SIZE = 32
EXTENDED_SIZE = 64
INODE_SLOT = 32  # nids count 32-byte slots from the start of the metadata area

# xattr name indexes: the prefix is stored as one byte, the rest as the name.
XATTR_USER = 1
XATTR_POSIX_ACL_ACCESS = 2
XATTR_POSIX_ACL_DEFAULT = 3
XATTR_TRUSTED = 4
XATTR_SECURITY = 6
XATTR_IBODY_HEADER_SIZE = 12
XATTR_ENTRY_HEADER_SIZE = 4
XATTR_MAX_SHARED_PER_INODE = 255  # h_shared_count is one byte
XATTR_MAX_IBODY = XATTR_IBODY_HEADER_SIZE + 4 * (0xFFFF - 1)  # i_xattr_icount is 16 bits

# Compressed files (see pclusters.py). The superblock's ZERO_PADDING feature
# (Linux 5.3, then called LZ4_0PADDING) puts a compressed cluster's bytes at the
# end of its block, after zeros: the kernel then knows the exact compressed
# length, decodes strictly, and may decompress in place.
FEATURE_INCOMPAT_ZERO_PADDING = 0x00000001
LCLUSTER_PLAIN = 0  # an extent starts here; its block holds the bytes uncompressed
LCLUSTER_HEAD = 1  # an extent starts here; its block holds them lz4-compressed (HEAD1)
LCLUSTER_NONHEAD = 2  # inside an extent that started in an earlier logical cluster
LCLUSTER_INDEX_SIZE = 8
# The full index array starts 16 bytes after the 8-aligned end of the inode and its
# xattrs: the 8-byte z_erofs_map_header, then 8 reserved bytes. An all-zero header
# says: lz4 for HEAD1, 4 KiB logical clusters, 1-block physical clusters, no tail
# packing, no fragments.
Z_MAP_AREA = 16

DIRENT_SIZE = 12
NAME_MAX = 255

# Directory entry file types (the generic FT_* values).
FT_REG = 1
FT_DIR = 2
FT_CHR = 3
FT_BLK = 4
FT_FIFO = 5
FT_SOCK = 6
FT_LNK = 7

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
_XATTR_IBODY_HEADER = struct.Struct("<IB7x")
_XATTR_ENTRY = struct.Struct("<BBH")
DIRENT = struct.Struct("<QHBx")
LCLUSTER_HEAD_INDEX = struct.Struct("<HHI")  # di_advise (type), di_clusterofs, di_blkaddr
LCLUSTER_NONHEAD_INDEX = struct.Struct("<HHHH")  # di_advise, unused, delta[0], delta[1]

assert _SUPER.size == 128
assert _COMPACT.size == COMPACT_SIZE
assert _EXTENDED.size == EXTENDED_SIZE
assert DIRENT.size == DIRENT_SIZE
assert LCLUSTER_HEAD_INDEX.size == LCLUSTER_NONHEAD_INDEX.size == LCLUSTER_INDEX_SIZE


def pack_superblock(
    *,
    root_nid: int,
    inos: int,
    build_time: int,
    build_time_nsec: int,
    blocks: int,
    meta_blkaddr: int,
    xattr_blkaddr: int,
    uuid: bytes,
    volume_name: bytes = b"",
    feature_incompat: int = 0,
) -> bytes:
    """The 128-byte superblock (no checksum; incompatible features as given)."""
    return _SUPER.pack(
        MAGIC,
        0,  # checksum: only checked when feature_compat has SB_CHKSUM
        0,  # feature_compat
        BLOCK_BITS,
        0,  # sb_extslots
        root_nid,
        inos,
        build_time,
        build_time_nsec,
        blocks,
        meta_blkaddr,
        xattr_blkaddr,
        uuid,
        volume_name,
        feature_incompat,
        # Without the COMPR_CFGS feature this field is lz4_max_distance, and
        # lz4 is the only algorithm: 0 means LZ4's own 64 KiB window.
        0,
        0,  # extra_devices
        0,  # devt_slotoff
        0,  # dirblkbits: directory blocks are filesystem blocks
        0,  # xattr_prefix_count
        0,  # xattr_prefix_start
        0,  # packed_nid
        0,  # xattr_filter_reserved
    )


def pack_compact_inode_into(
    buf: bytearray,
    offset: int,
    layout: int,
    xattr_icount: int,
    mode: int,
    nlink: int,
    size: int,
    i_u: int,
    ino: int,
    uid: int,
    gid: int,
) -> None:
    """A 32-byte inode at ``buf[offset:]``; its mtime is the superblock's build time."""
    _COMPACT.pack_into(
        buf,
        offset,
        layout << 1,
        xattr_icount,
        mode,
        nlink,
        size,
        0,
        i_u,
        ino & 0xFFFFFFFF,
        uid,
        gid,
        0,
    )


def pack_extended_inode_into(
    buf: bytearray,
    offset: int,
    layout: int,
    xattr_icount: int,
    mode: int,
    nlink: int,
    size: int,
    i_u: int,
    ino: int,
    uid: int,
    gid: int,
    mtime: int,
    mtime_nsec: int,
) -> None:
    """A 64-byte inode at ``buf[offset:]``."""
    _EXTENDED.pack_into(
        buf,
        offset,
        INODE_EXTENDED | (layout << 1),
        xattr_icount,
        mode,
        0,
        size,
        i_u,
        ino & 0xFFFFFFFF,
        uid,
        gid,
        mtime & 0xFFFFFFFFFFFFFFFF,  # two's complement keeps pre-1970 times
        mtime_nsec,
        nlink,
    )


def z_index_offset(inode_and_xattrs: int) -> int:
    """Where the full lcluster index starts, from a compressed inode's record start."""
    return inode_and_xattrs + (-inode_and_xattrs % 8) + Z_MAP_AREA


def encode_rdev(major: int, minor: int) -> int:
    """The kernel's 32-bit 'new' device encoding, which EROFS stores in i_u."""
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)


def pack_xattr_ibody_header(shared_count: int) -> bytes:
    # h_name_filter 0: the bloom filter is only read with the XATTR_FILTER feature.
    return _XATTR_IBODY_HEADER.pack(0, shared_count)


def xattr_entry(index: int, name: bytes, value: bytes) -> bytes:
    """One xattr entry (inline or shared), padded to 4 bytes."""
    raw = _XATTR_ENTRY.pack(len(name), index, len(value)) + name + value
    return raw + b"\0" * (-len(raw) % 4)


def xattr_icount(ibody_size: int) -> int:
    """i_xattr_icount for an xattr body of ``ibody_size`` bytes (0: none)."""
    if ibody_size == 0:
        return 0
    return (ibody_size - XATTR_IBODY_HEADER_SIZE) // 4 + 1
