"""lz4/lz4hc images from the converter, checked without root by ``fsck.erofs``.

``fsck.erofs --extract`` decodes every extent the way erofs-utils does (an
implementation independent of ours) and the extracted files must equal the
tar's. The kernel reads the same images in tests/privileged/test_erofs_convert.py.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import need
from erofs_layers import (
    BOUNDARY_SIZES,
    KINDS,
    Member,
    build_tar,
    content,
    contents,
    extract_image,
    file_contents,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratasnap.erofs import COMPRESSIONS, convert_tar
from stratasnap.erofs import format as fmt
from stratasnap.erofs.lz4 import Lz4, library_error
from stratasnap.erofs.pclusters import FileClusters
from stratasnap.erofs.tree import NO_XATTRS, Node

COMPRESSED = ("lz4", "lz4hc")


@pytest.fixture(autouse=True)
def _liblz4() -> None:
    need(library_error() is None, f"liblz4 >= 1.9.3 (liblz4-1): {library_error()}")


def test_compressions_offered() -> None:
    assert COMPRESSIONS == ("none", "lz4", "lz4hc")
    with pytest.raises(ValueError, match="none, lz4, lz4hc"):
        convert_tar(io.BytesIO(build_tar([])), "/nonexistent/x", compression="zstd")


def _file(size: int) -> FileClusters:
    node = Node(0o100644, 0, 0, 0, 0, NO_XATTRS)
    node.size = size
    return FileClusters(node)


def _entries(index: bytes) -> list[tuple[int, ...]]:
    """(type, clusterofs, blkaddr) for heads, (type, delta0, delta1) for nonheads."""
    out: list[tuple[int, ...]] = []
    for (advise,) in struct.iter_unpack("<H6x", index):
        at = len(out) * 8
        if advise == fmt.LCLUSTER_NONHEAD:
            out.append((advise, *struct.unpack_from("<HH", index, at + 4)))
        else:
            out.append((advise, *struct.unpack_from("<HI", index, at + 2)))
    return out


def test_index_of_mixed_extents_worked_by_hand() -> None:
    """30,000 bytes: compressed 10,000 (block 5), raw 4,096 (6), compressed 15,904 (7)."""
    f = _file(30_000)
    f.extent(10_000, True, 5)
    f.extent(4096, False, 6)
    f.extent(15_904, True, 7)
    f.finish()
    head, plain, nonhead = fmt.LCLUSTER_HEAD, fmt.LCLUSTER_PLAIN, fmt.LCLUSTER_NONHEAD
    assert _entries(f.node.zindex or b"") == [
        (head, 0, 5),  # cluster 0: the file starts
        (nonhead, 1, 1),  # 4096: inside extent 1, its head 1 back, the next head 1 ahead
        (plain, 10_000 - 8192, 6),  # the raw extent starts at 10,000
        (head, 14_096 - 12_288, 7),  # the last extent starts at 14,096
        (nonhead, 1, 3),
        (nonhead, 2, 2),
        (nonhead, 3, 1),
        (plain, 30_000 - 28_672, 0),  # the file ends at 30,000, inside cluster 7
    ]
    assert f.node.blkaddr == 3  # a compressed inode's i_u: its blocks


def test_a_file_with_only_raw_extents_is_a_plain_block_run() -> None:
    f = _file(9000)
    for length, block in ((4096, 20), (4096, 21), (808, 22)):
        f.extent(length, False, block)
    f.finish()
    assert f.node.zindex is None and f.node.blkaddr == 20


def test_two_extents_starting_in_one_cluster_are_refused() -> None:
    f = _file(9000)
    f.extent(100, False, 1)
    with pytest.raises(AssertionError, match="one logical cluster"):
        f.extent(100, False, 2)


def _files_tar(files: dict[str, bytes]) -> bytes:
    return build_tar([Member(name, "file", data=data) for name, data in files.items()])


@pytest.mark.parametrize("compression", COMPRESSED)
def test_every_boundary_size_and_kind_extracts_exactly(tmp_path: Path, compression: str) -> None:
    files = {
        f"{kind}/{size}": content(kind, size, seed=size)
        for kind in KINDS
        for size in BOUNDARY_SIZES
    }
    members = [Member(name, "file", data=data) for name, data in files.items()]
    members += [Member("links/text", "hardlink", target=f"text/{4 << 20}")]
    members += [Member("links/mixed", "hardlink", target=f"mixed/{(1 << 20) + 4097}")]
    tar = build_tar(members)
    stats = convert_tar(io.BytesIO(tar), tmp_path / "img", compression=compression)
    assert extract_image(tmp_path / "img", tmp_path / "x") == contents(members)
    # Text and zeros over two blocks always compress; random data never does.
    sure = sum(1 for n, d in files.items() if len(d) > 8192 and not n.startswith("random"))
    maybe = sum(1 for n, d in files.items() if len(d) > 4096 and not n.startswith("random"))
    assert sure <= stats.compressed_files <= maybe
    assert stats.image_bytes < 0.6 * len(tar)


@pytest.mark.parametrize("compression", COMPRESSED)
def test_incompressible_files_cost_no_more_than_uncompressed(
    tmp_path: Path, compression: str
) -> None:
    """Files that gain nothing stay plain block runs: no index, same image size."""
    tar = _files_tar({f"r{size}": content("random", size, size) for size in BOUNDARY_SIZES})
    plain = convert_tar(io.BytesIO(tar), tmp_path / "none")
    packed = convert_tar(io.BytesIO(tar), tmp_path / "lz4", compression=compression)
    assert packed.compressed_files == 0
    assert packed.image_bytes == plain.image_bytes
    # Nothing compressed: the image asks for no compression feature either.
    sb = (tmp_path / "lz4").read_bytes()[fmt.SUPER_OFFSET : fmt.SUPER_OFFSET + 128]
    assert struct.unpack_from("<I", sb, 0x50)[0] == 0


def test_compressed_images_announce_zero_padding(tmp_path: Path) -> None:
    convert_tar(
        io.BytesIO(_files_tar({"t": content("text", 50_000)})), tmp_path / "i", compression="lz4"
    )
    sb = (tmp_path / "i").read_bytes()[fmt.SUPER_OFFSET : fmt.SUPER_OFFSET + 128]
    assert struct.unpack_from("<I", sb, 0x50)[0] == fmt.FEATURE_INCOMPAT_ZERO_PADDING


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    datas=st.lists(file_contents(), min_size=1, max_size=6),
    links=st.lists(st.integers(0, 5), max_size=3),
    compression=st.sampled_from(COMPRESSED),
)
def test_generated_files_extract_exactly(
    datas: list[bytes], links: list[int], compression: str, tmp_path: Path
) -> None:
    members = [Member(f"d/f{i}", "file", data=data) for i, data in enumerate(datas)]
    members += [
        Member(f"l{j}", "hardlink", target=f"d/f{i % len(datas)}") for j, i in enumerate(links)
    ]
    work = tmp_path / os.urandom(4).hex()
    work.mkdir()
    convert_tar(io.BytesIO(build_tar(members)), work / "img", compression=compression)
    assert extract_image(work / "img", work / "x") == contents(members)


@pytest.mark.parametrize("compression", COMPRESSED)
def test_as_small_as_mkfs_erofs_on_real_files(tmp_path: Path, compression: str) -> None:
    """Python's stdlib sources: within 1% of ``mkfs.erofs -z<compression>`` 1.5's image."""
    need(shutil.which("mkfs.erofs") is not None, "mkfs.erofs (erofs-utils) not installed")
    stdlib = Path(os.__file__).parent
    parts = [p for p in ("email", "json", "asyncio", "encodings") if (stdlib / p).is_dir()]
    tar = subprocess.run(
        ["tar", "--format=pax", "-cf", "-", "-C", str(stdlib), *parts],
        check=True,
        capture_output=True,
    ).stdout
    extracted = tmp_path / "x"
    extracted.mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(extracted)], input=tar, check=True)
    reference = tmp_path / "mkfs.erofs"
    subprocess.run(
        [
            "mkfs.erofs",
            "--quiet",
            f"-z{compression}",
            "-Enoinline_data",
            str(reference),
            str(extracted),
        ],
        check=True,
    )
    stats = convert_tar(io.BytesIO(tar), tmp_path / "ours", compression=compression)
    theirs = reference.stat().st_size
    print(f"{compression}: ours {stats.image_bytes}, mkfs.erofs {theirs}, tar {len(tar)}")
    assert stats.image_bytes <= theirs * 1.01
    assert stats.image_bytes < 0.75 * len(tar)
    assert extract_image(tmp_path / "ours", tmp_path / "back") == extract_image(
        reference, tmp_path / "ref-back"
    )


def test_images_do_not_depend_on_which_worker_finishes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks are placed in job order: one worker or three, the same bytes."""
    from stratasnap.erofs import compressed_writer

    files = {f"{k}/{n}": content(k, n, n) for k in KINDS for n in BOUNDARY_SIZES[8:]}
    tar = _files_tar(files)
    images = []
    for threads in (1, 3):
        monkeypatch.setattr(compressed_writer, "THREADS", threads)
        image = tmp_path / f"t{threads}"
        convert_tar(io.BytesIO(tar), image, uuid=bytes(16), compression="lz4")
        images.append(image.read_bytes())
    assert images[0] == images[1]


def test_a_compression_error_fails_the_conversion_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def broken(*args: object) -> tuple[int, int]:
        calls.append(1)
        if len(calls) > 50:  # some jobs done, then failures on every worker
            raise MemoryError("out of memory in the compressor")
        return 0, 0

    monkeypatch.setattr(Lz4, "compress", broken)
    tar = _files_tar({f"f{i}": content("text", 300_000, i) for i in range(40)})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MemoryError, match="in the compressor"):
        convert_tar(io.BytesIO(tar), out / "img", compression="lz4")
    assert list(out.iterdir()) == []


def test_a_compressor_output_that_does_not_decode_back_is_stored_raw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each compressed block is decoded once before use: a library bug costs space, not data."""
    import ctypes
    import types

    from stratasnap.erofs import lz4

    real = lz4._load()
    assert not isinstance(real, str)

    def corrupting(src: int, dst: int, consumed: object, dst_len: int) -> int:
        out: int = real.dll.LZ4_compress_destSize(src, dst, consumed, dst_len)
        last = ctypes.c_ubyte.from_address(dst + out - 1)
        last.value ^= 0x55  # a literal byte of the last sequence: decodes, wrongly
        return out

    dll = types.SimpleNamespace(**{**vars(real.dll), "LZ4_compress_destSize": corrupting})
    monkeypatch.setattr(lz4, "_load", lambda: lz4._Lib(dll, real.version))  # type: ignore[arg-type]
    members = [Member("t", "file", data=content("text", 300_000))]
    stats = convert_tar(io.BytesIO(build_tar(members)), tmp_path / "i", compression="lz4")
    assert stats.compressed_files == 0
    assert extract_image(tmp_path / "i", tmp_path / "x") == contents(members)
