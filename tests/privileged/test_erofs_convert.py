"""The tar -> EROFS converter against the kernel, fsck.erofs and mkfs.erofs 1.5.

Every image must pass ``fsck.erofs``, mount, and show exactly the tar's
content after whiteout rules; a second oracle is ``mkfs.erofs`` fed the same
layer extracted by GNU tar.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from conftest import need, need_kernel, need_root
from erofs_layers import (
    Member,
    build_tar,
    expected_tree,
    kernel_reads_lz4,
    layers,
    libarchive_tar,
    mounted_image,
    snapshot,
)
from hypothesis import HealthCheck, given, settings

from stratasnap.erofs import convert_tar
from stratasnap.errors import ResourceExhausted

pytestmark = pytest.mark.privileged


def _fsck(image: Path) -> None:
    need(shutil.which("fsck.erofs") is not None, "fsck.erofs (erofs-utils) not installed")
    r = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _convert_and_mount(
    members: list[Member], work: Path, compression: str = "none"
) -> dict[str, object]:
    image = work / "layer.erofs"
    convert_tar(io.BytesIO(build_tar(members)), image, compression=compression)
    _fsck(image)
    with mounted_image(image, work / "mnt") as mnt:
        return dict(snapshot(mnt))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(members=layers())
@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_mounted_image_equals_tar_after_whiteouts(
    members: list[Member], compression: str, scratch: Path
) -> None:
    need_root()
    if compression != "none":
        need_kernel(kernel_reads_lz4(scratch), "EROFS lz4 decompression (CONFIG_EROFS_FS_ZIP)")
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        assert _convert_and_mount(members, work, compression) == expected_tree(members)
    finally:
        shutil.rmtree(work)


def test_every_kind_of_member(scratch: Path) -> None:
    need_root()
    members = [
        Member(".", "dir", mode=0o755, mtime=1_600_000_000),
        Member("etc", "dir", mode=0o755, uid=70000, gid=70001),
        Member("etc/passwd", "file", data=b"root:x:0:0\n", xattrs={"user.k": "v"}),
        Member("etc/shadow", "hardlink", target="etc/passwd"),
        Member("/abs/file", "file", mode=0o4755, data=b"s" * 10000, mtime_nsec=123456789),
        Member("./dot/./file", "file", data=b"d"),
        Member("bin", "symlink", target="usr/bin"),
        Member("dev/null", "chr", mode=0o666, dev=(1, 3)),
        Member("dev/sda", "blk", mode=0o660, dev=(8, 0)),
        Member("dev/big", "chr", dev=(4095, 1048575)),
        Member("run/fifo", "fifo", mode=0o600),
        Member("etc/.wh.removed", "file", uid=5, gid=6),
        Member("var/.wh..wh..opq", "file"),
        Member(
            "var/keep", "file", data=b"k", xattrs={"trusted.overlay.x": "1", "security.label": "c"}
        ),
        Member("a/very/deep/implicit/parent/file", "file", data=b"deep"),
    ]
    got = _convert_and_mount(members, scratch)
    assert got == expected_tree(members)
    with mounted_image(scratch / "layer.erofs", scratch / "loop", loop=True) as mnt:
        assert snapshot(mnt) == got  # the same through a loop device
    assert got["etc/removed"].kind == "chr" and got["etc/removed"].rdev == (0, 0)  # type: ignore[attr-defined]
    assert ("trusted.overlay.opaque", b"y") in got["var"].xattrs  # type: ignore[attr-defined]
    assert got["etc/passwd"].nlink == 2  # type: ignore[attr-defined]


def test_large_directory_and_long_names(scratch: Path) -> None:
    """Directories spanning many blocks (binary search over blocks) and 255-byte names."""
    need_root()
    members = [Member("d", "dir", mode=0o755)]
    files = [Member(f"d/{i:05d}-{'n' * (i % 200)}", "file", data=b"%d" % i) for i in range(3000)]
    random.Random(7).shuffle(files)  # the converter must sort; the tar need not be sorted
    members += files
    members += [Member("d/" + "L" * 255, "symlink", target="t" * 4000)]
    got = _convert_and_mount(members, scratch)
    assert got == expected_tree(members)
    # Lookups by name (not only readdir) find entries in every block.
    with mounted_image(scratch / "layer.erofs", scratch / "mnt2") as mnt:
        for i in range(0, 3000, 97):
            assert (mnt / f"d/{i:05d}-{'n' * (i % 200)}").read_bytes() == b"%d" % i


def test_same_tree_as_mkfs_erofs_from_the_extracted_layer(scratch: Path) -> None:
    need_root()
    need(shutil.which("mkfs.erofs") is not None, "mkfs.erofs (erofs-utils) not installed")
    members = [
        Member(".", "dir", mode=0o755, mtime=1_650_000_000),
        Member("usr", "dir", mode=0o755),
        Member("usr/bin", "dir", mode=0o755, xattrs={"user.dir": "1"}),
        Member("usr/bin/tool", "file", mode=0o4755, data=b"\x7fELF" * 3000, uid=1000, gid=1000),
        Member("usr/bin/tool2", "hardlink", target="usr/bin/tool"),
        Member("usr/lib", "symlink", target="../lib"),
        Member("usr/share", "dir", mode=0o2775, uid=70000, gid=0, mtime_nsec=42),
        Member("usr/share/doc", "file", data=b"hello\n" * 1000, xattrs={"user.a": "b"}),
        Member("usr/share/empty", "file", mtime=0),
        Member("dev", "dir"),
        Member("dev/tty", "chr", mode=0o620, dev=(5, 0)),
        Member("dev/loop0", "blk", dev=(7, 0)),
        Member("dev/initctl", "fifo", mode=0o600),
    ]
    tar = build_tar(members)
    extracted = scratch / "extracted"
    extracted.mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            "-",
            "-C",
            str(extracted),
        ],
        input=tar,
        check=True,
    )
    reference = scratch / "mkfs.erofs"
    subprocess.run(
        ["mkfs.erofs", "--quiet", "-Enoinline_data", str(reference), str(extracted)], check=True
    )
    ours = scratch / "ours.erofs"
    convert_tar(io.BytesIO(tar), ours)
    _fsck(ours)
    with mounted_image(reference, scratch / "m1") as m1, mounted_image(ours, scratch / "m2") as m2:
        theirs_tree, ours_tree = snapshot(m1), snapshot(m2)
    assert ours_tree == theirs_tree
    assert ours_tree == expected_tree(members)


def _big_layer(stream: BinaryIO, big_size: int, marker_every: int, small_files: int) -> None:
    """Write a tar with one ``big_size`` file (mostly zero chunks) and many small files."""
    chunk = 1 << 20
    ti = tarfile.TarInfo("var/lib/big.img")
    ti.size = big_size
    stream.write(ti.tobuf(tarfile.PAX_FORMAT))
    zero = bytes(chunk)
    for i in range(big_size // chunk):
        stream.write(bytes([i % 251 + 1]) * chunk if i % marker_every == 0 else zero)
    stream.write(bytes(-big_size % 512))
    for i in range(small_files):
        ti = tarfile.TarInfo(f"etc/small-{i}")
        ti.size = 100
        stream.write(ti.tobuf(tarfile.PAX_FORMAT) + b"s" * 100 + bytes(412))
    stream.write(bytes(1024))


def _convert_in_child(
    image: Path, feed: Callable[[BinaryIO], None], *options: str
) -> dict[str, int]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "stratasnap", "erofs", "convert", "-", str(image)),
            *("--json", *options),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin

    def run() -> None:
        with stdin:
            feed(cast(BinaryIO, stdin))

    feeder = threading.Thread(target=run)
    feeder.start()
    out = proc.stdout.read()
    feeder.join()
    assert proc.wait() == 0
    result: dict[str, int] = json.loads(out)
    return result  # peak_rss_kib is the child's own VmHWM, not wait4's fork-inflated figure


def test_memory_stays_bounded_on_a_multi_gb_layer(scratch: Path) -> None:
    """3 GiB of file data through a pipe: peak RSS grows by buffers and metadata only."""
    need_root()
    big, every = 3 << 30, 64
    image = scratch / "big.erofs"
    small = _convert_in_child(scratch / "small.erofs", lambda f: _big_layer(f, 1 << 20, 1, 10))
    stats = _convert_in_child(image, lambda f: _big_layer(f, big, every, 5000))
    assert stats["data_bytes"] == big + 5000 * 100
    growth_mb = (stats["peak_rss_kib"] - small["peak_rss_kib"]) / 1024
    print(f"peak RSS {stats['peak_rss_kib'] / 1024:.0f} MB, {growth_mb:.0f} MB over a 1 MiB layer")
    assert growth_mb < 48, f"peak RSS grew {growth_mb:.0f} MB for a 3 GiB layer"
    # Zero chunks stayed holes: the image takes little more than the marker chunks.
    assert image.stat().st_blocks * 512 < big // every * 2 + (64 << 20)
    _fsck(image)
    with mounted_image(image, scratch / "mnt") as mnt:
        f = mnt / "var/lib/big.img"
        assert f.stat().st_size == big
        with f.open("rb") as fh:
            for i in (0, every, 5 * every, big // (1 << 20) - every):
                fh.seek(i << 20)
                assert fh.read(1 << 20) == bytes([i % 251 + 1]) * (1 << 20)
            fh.seek((every + 1) << 20)
            assert fh.read(1 << 20) == bytes(1 << 20)
        assert (mnt / "etc/small-4999").read_bytes() == b"s" * 100


def test_xattr_bodies_larger_than_a_block(scratch: Path) -> None:
    """Inode records over 4 KiB (big xattrs) start on a block and keep their data out of line."""
    need_root()
    big = {f"user.k{i}": chr(ord("a") + i) * 3000 for i in range(10)}
    shared = {f"user.s{i}": "shared" * 100 for i in range(5)}
    members = [
        Member("d", "dir", xattrs={"user.dir": "x" * 6000}),
        Member("d/f", "file", data=b"tail" * 100, xattrs=big),
        *[Member(f"d/g{i}", "file", data=b"g", xattrs=shared) for i in range(20)],
        Member("d/l", "symlink", target="t" * 3000),
    ]
    assert _convert_and_mount(members, scratch) == expected_tree(members)


def test_libarchive_xattrs_reach_the_mounted_tree(scratch: Path) -> None:
    need_root()
    image = scratch / "l.erofs"
    convert_tar(io.BytesIO(libarchive_tar()), image)
    _fsck(image)
    with mounted_image(image, scratch / "mnt") as mnt:
        assert os.getxattr(mnt / "f", "user.with space") == b"\x00\xffbin"
        assert os.getxattr(mnt / "f", "trusted.t") == b"v"


def test_full_disk_is_resource_exhausted_and_leaves_nothing(scratch: Path) -> None:
    need_root()
    small = scratch / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        tar = build_tar([Member(f"f{i}", "file", data=os.urandom(300_000)) for i in range(20)])
        with pytest.raises(ResourceExhausted):
            convert_tar(io.BytesIO(tar), small / "layer.erofs")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_later_members_replace_earlier_ones_like_an_extraction(scratch: Path) -> None:
    """Replacement keeps hard-link counts right: a link keeps the inode it was made to."""
    need_root()
    members = [
        Member("a", "file", data=b"old"),
        Member("b", "hardlink", target="a"),
        Member("a", "file", data=b"new"),  # b keeps "old"; both now have one link
        Member("d", "dir"),
        Member("d/inner", "file", data=b"inner"),
        Member("outer", "hardlink", target="d/inner"),
        Member("d", "file", data=b"d is a file now"),  # drops d/inner; outer survives
        Member("w", "file", data=b"stays"),
        Member(".wh.w", "file", uid=3),  # hides lower layers only: this layer's w stays
        Member("v", "dir"),
        Member("v/mine", "file"),
        Member(".wh.v", "file"),  # v stays, opaque: only this layer's v/mine shows
        Member(".wh.u", "file"),
        Member("u/new", "file"),  # u recreated after its whiteout: an opaque directory
        Member(".wh.t", "file"),
        Member("t", "dir"),  # likewise, listed
        Member(".wh.s", "file", uid=4),  # a plain whiteout
        Member("e", "dir", mode=0o700),
        Member("e/x", "file"),
        Member("e", "dir", mode=0o755, uid=9),  # re-listing keeps e/x
    ]
    image = scratch / "r.erofs"
    convert_tar(io.BytesIO(build_tar(members)), image)
    _fsck(image)
    with mounted_image(image, scratch / "mnt") as mnt:
        got = snapshot(mnt)
        assert (mnt / "a").read_bytes() == b"new" and (mnt / "b").read_bytes() == b"old"
        assert (mnt / "outer").read_bytes() == b"inner"
        assert (mnt / "d").read_bytes() == b"d is a file now"
        assert (mnt / "w").read_bytes() == b"stays"
    assert got["a"].nlink == got["b"].nlink == got["outer"].nlink == 1
    assert got["s"].kind == "chr" and got["s"].rdev == (0, 0) and got["s"].uid == 4
    opaque = ("trusted.overlay.opaque", b"y")
    for d in ("v", "u", "t"):
        assert got[d].kind == "dir" and opaque in got[d].xattrs, d
    assert got["e"].mode == 0o755 and got["e"].uid == 9 and "e/x" in got
    assert opaque not in got["e"].xattrs
    assert sorted(got) == [
        "",
        "a",
        "b",
        "d",
        "e",
        "e/x",
        "outer",
        "s",
        "t",
        "u",
        "u/new",
        "v",
        "v/mine",
        "w",
    ]


@pytest.mark.parametrize("compression", ["none", "lz4", "lz4hc"])
def test_real_tree_tarred_by_gnu_tar_matches_mkfs_erofs(scratch: Path, compression: str) -> None:
    """Real files (parts of Python's stdlib) tarred by GNU tar: the same tree as mkfs.erofs
    (compressed with the same compressor, when compressing)."""
    need_root()
    need(shutil.which("mkfs.erofs") is not None, "mkfs.erofs (erofs-utils) not installed")
    if compression != "none":
        need_kernel(kernel_reads_lz4(scratch), "EROFS lz4 decompression (CONFIG_EROFS_FS_ZIP)")
    stdlib = Path(os.__file__).parent
    parts = [
        p for p in ("email", "json", "asyncio", "encodings", "unittest") if (stdlib / p).is_dir()
    ]
    tar = subprocess.run(
        ["tar", "--format=pax", "--xattrs", "-cf", "-", "-C", str(stdlib), *parts],
        check=True,
        capture_output=True,
    ).stdout
    extracted = scratch / "x"
    extracted.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--numeric-owner", "-xpf", "-", "-C", str(extracted)],
        input=tar,
        check=True,
    )
    z = [f"-z{compression}"] if compression != "none" else []
    subprocess.run(
        ["mkfs.erofs", "--quiet", *z, "-Enoinline_data", str(scratch / "ref"), str(extracted)],
        check=True,
    )
    stats = convert_tar(io.BytesIO(tar), scratch / "ours", compression=compression)
    _fsck(scratch / "ours")
    assert stats.files > 300
    if compression != "none":
        assert stats.compressed_files > 100
        assert stats.image_bytes <= (scratch / "ref").stat().st_size * 1.01
    with (
        mounted_image(scratch / "ref", scratch / "m1") as m1,
        mounted_image(scratch / "ours", scratch / "m2") as m2,
    ):
        theirs, ours = snapshot(m1), snapshot(m2)
    # The root is not in the tar: extraction gives it the time of extraction, we the layer's newest.
    assert theirs.pop("").kind == ours.pop("").kind == "dir"
    assert ours == theirs


def test_images_stack_as_overlayfs_lower_layers(scratch: Path) -> None:
    """Two converted layers as overlayfs lowerdirs: the upper's whiteouts hide the lower."""
    need_root()
    lower = [
        Member("a", "file", data=b"a"),
        Member("b", "file", data=b"b"),
        Member("d", "dir"),
        Member("d/x", "file", data=b"x"),
        Member("e", "dir"),
        Member("e/keep", "file", data=b"keep"),
    ]
    upper = [
        Member(".wh.a", "file"),
        Member("d", "dir"),
        Member("d/.wh..wh..opq", "file"),
        Member("d/y", "file", data=b"y"),
        Member("e/new", "file", data=b"new"),
    ]
    layers_dirs = []
    for name, members in (("lower", lower), ("upper", upper)):
        convert_tar(io.BytesIO(build_tar(members)), scratch / f"{name}.erofs")
        layers_dirs.append(scratch / f"{name}-mnt")
    with (
        mounted_image(scratch / "lower.erofs", layers_dirs[0]) as lo,
        mounted_image(scratch / "upper.erofs", layers_dirs[1]) as up,
    ):
        merged = scratch / "merged"
        merged.mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={up}:{lo}", str(merged)],
            check=True,
        )
        try:
            assert sorted(os.listdir(merged)) == ["b", "d", "e"]
            assert sorted(os.listdir(merged / "d")) == ["y"]  # opaque: d/x hidden
            assert sorted(os.listdir(merged / "e")) == ["keep", "new"]  # not opaque: merged
            assert (merged / "e/keep").read_bytes() == b"keep"
        finally:
            subprocess.run(["umount", str(merged)], check=True)


def _many_files(stream: BinaryIO, count: int) -> None:
    for d in range(count // 1000):
        ti = tarfile.TarInfo(f"usr/share/d{d:04d}")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        stream.write(ti.tobuf(tarfile.USTAR_FORMAT))
        for i in range(1000):
            ti = tarfile.TarInfo(f"usr/share/d{d:04d}/a-typical-file-name-{i:05d}.py")
            ti.size, ti.mtime = 100, 1_700_000_000
            stream.write(ti.tobuf(tarfile.USTAR_FORMAT) + b"x" * 100 + bytes(412))
    stream.write(bytes(1024))


def test_memory_per_inode_stays_small(scratch: Path) -> None:
    """Metadata is what stays in memory: well under 1 KiB per inode (measured ~450 B)."""
    need_root()
    few = _convert_in_child(scratch / "few.erofs", lambda f: _many_files(f, 1000))
    many = _convert_in_child(scratch / "many.erofs", lambda f: _many_files(f, 100_000))
    per_inode = (many["peak_rss_kib"] - few["peak_rss_kib"]) * 1024 / 99_000
    print(f"{per_inode:.0f} bytes per inode")
    assert per_inode < 1000
