"""lz4/lz4hc images from the converter, read by the kernel.

Every image passes ``fsck.erofs``, mounts (file-backed where the kernel can,
and through a loop device), and reads back byte for byte: whole files, and
pieces at arbitrary offsets on a cold mount (the kernel then decodes extents
partially). The generated-layer property test runs with lz4 in
test_erofs_convert.py; ``fsck.erofs --extract`` checks in
tests/unit/test_erofs_compression.py.
"""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
from pathlib import Path
from typing import BinaryIO

import pytest
from conftest import need_kernel, need_root
from erofs_layers import (
    BOUNDARY_SIZES,
    KINDS,
    MIB,
    Member,
    build_tar,
    content,
    expected_tree,
    kernel_reads_lz4,
    mounted_image,
    snapshot,
)
from test_erofs_convert import _convert_in_child, _fsck

from stratasnap.erofs import convert_tar

pytestmark = pytest.mark.privileged


@pytest.fixture
def lz4_kernel(scratch: Path) -> None:
    need_root()
    need_kernel(kernel_reads_lz4(scratch), "EROFS lz4 decompression (CONFIG_EROFS_FS_ZIP)")


@pytest.mark.parametrize("compression", ["lz4", "lz4hc"])
def test_boundary_sizes_read_back_whole_and_in_pieces(
    scratch: Path, lz4_kernel: None, compression: str
) -> None:
    files = {f"{k}/{n}": content(k, n, seed=n) for k in KINDS for n in BOUNDARY_SIZES}
    members = [Member(name, "file", data=data) for name, data in files.items()]
    members.append(Member("hard", "hardlink", target=f"mixed/{4 * MIB + 1}"))
    image = scratch / "img"
    stats = convert_tar(io.BytesIO(build_tar(members)), image, compression=compression)
    assert stats.compressed_files > len(BOUNDARY_SIZES)
    _fsck(image)
    rng = random.Random(5)
    for loop in (False, True):
        with mounted_image(image, scratch / f"mnt-{loop}", loop=loop) as mnt:
            # Cold pages first: reads inside, across and at the ends of extents.
            for name, data in files.items():
                with (mnt / name).open("rb", buffering=0) as f:
                    for _ in range(4):
                        at = rng.randrange(len(data) + 1)
                        f.seek(at)
                        want = data[at : at + rng.choice((1, 100, 5000, 70000))]
                        assert f.read(len(want)) == want, (name, at)
            assert snapshot(mnt) == expected_tree(members)


# A large file in 1 MiB chunks: text, incompressible, zeros, mixed, over and over.
_TEXT = content("text", MIB, 1)
_MIXED = content("mixed", MIB, 2)


def _chunk(i: int) -> bytes:
    kind = i % 4
    if kind == 0:
        return i.to_bytes(8, "little") + _TEXT[8:]
    if kind == 1:
        return random.Random(i).randbytes(MIB)
    if kind == 2:
        return bytes(MIB)
    return _MIXED[i % 1000 :] + _MIXED[: i % 1000]


def _large_layer(stream: BinaryIO, chunks: int, tail: int, digest: hashlib._Hash) -> None:
    ti = tarfile.TarInfo("var/big")
    ti.size = chunks * MIB + tail
    stream.write(ti.tobuf(tarfile.PAX_FORMAT))
    for i in range(chunks):
        data = _chunk(i)
        digest.update(data)
        stream.write(data)
    end = _TEXT[:tail]
    digest.update(end)
    stream.write(end + bytes(-ti.size % 512))
    small = build_tar([Member(f"etc/f{i}", "file", data=b"s" * i) for i in range(2000)])
    stream.write(small)  # its own end-of-archive blocks end the stream


def test_a_large_file_streams_through_with_memory_bounded(scratch: Path, lz4_kernel: None) -> None:
    """512 MiB through a pipe into lz4: peak RSS grows by buffers only; reads back exactly."""
    chunks, tail = 512, 12345
    digest = hashlib.sha256()
    baseline = _convert_in_child(
        scratch / "small.erofs",
        lambda f: _large_layer(f, 1, 0, hashlib.sha256()),
        "--compression=lz4",
    )
    stats = _convert_in_child(
        scratch / "big.erofs",
        lambda f: _large_layer(f, chunks, tail, digest),
        "--compression=lz4",
    )
    assert stats["data_bytes"] == chunks * MIB + tail + sum(range(2000))
    growth_mb = (stats["peak_rss_kib"] - baseline["peak_rss_kib"]) / 1024
    print(f"peak RSS {stats['peak_rss_kib'] / 1024:.0f} MB, {growth_mb:.0f} MB over 1 MiB")
    assert growth_mb < 48, f"peak RSS grew {growth_mb:.0f} MB for a 512 MiB file"
    # A quarter is incompressible, a quarter zeros: well under 3/4 of the data.
    assert stats["image_bytes"] < 0.6 * chunks * MIB
    _fsck(scratch / "big.erofs")
    with mounted_image(scratch / "big.erofs", scratch / "mnt") as mnt:
        got = hashlib.sha256()
        with (mnt / "var/big").open("rb") as f:
            for i in range(chunks):
                data = f.read(MIB)
                assert data == _chunk(i), f"chunk {i} differs"
                got.update(data)
            got.update(f.read())
        assert got.hexdigest() == digest.hexdigest()
        assert (mnt / "etc/f1999").read_bytes() == b"s" * 1999
