"""The converter's tar input: hostile and corrupt archives are refused cleanly.

Every refusal is a typed error (an InvalidArgument) and leaves no file in the
output directory. Accepted archives are checked without root through
``fsck.erofs --extract``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from erofs_layers import Member, build_tar, extract_image, layers, libarchive_tar
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratasnap.erofs import (
    COMPRESSIONS,
    LayerTooLarge,
    TarFormatError,
    TruncatedTar,
    UnsafeEntry,
    convert_tar,
)
from stratasnap.errors import InvalidArgument


def _set_field(tar: bytes, header_at: int, start: int, value: bytes) -> bytes:
    """Overwrite a header field and fix the header checksum."""
    block = bytearray(tar[header_at : header_at + 512])
    block[start : start + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return tar[:header_at] + bytes(block) + tar[header_at + 512 :]


def _checksum_ok(tar: bytes | bytearray, at: int) -> bool:
    block = bytes(tar[at : at + 512])
    try:
        stored = int(block[148:156].split(b"\0")[0].strip() or b"x", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 256 + sum(block[156:])


def _refused(tar: bytes, tmp_path: Path, error: type[Exception]) -> Exception:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(error) as info:
        convert_tar(io.BytesIO(tar), out / "layer.erofs")
    assert isinstance(info.value, InvalidArgument)
    assert list(out.iterdir()) == [], "a refused tar must leave nothing behind"
    return info.value


ONE_FILE = build_tar([Member("f", "file", data=b"x" * 700)])


def test_not_a_tar(tmp_path: Path) -> None:
    err = _refused(os.urandom(4096), tmp_path, TarFormatError)
    assert "checksum" in str(err)


def test_truncated_header(tmp_path: Path) -> None:
    _refused(ONE_FILE[:300], tmp_path, TruncatedTar)


def test_truncated_data(tmp_path: Path) -> None:
    err = _refused(ONE_FILE[: 512 + 100], tmp_path, TruncatedTar)
    assert "member data" in str(err)


@pytest.mark.parametrize("name", ["../evil", "a/../../etc/passwd", "a/..", "x/" + "n" * 256])
def test_unsafe_names(tmp_path: Path, name: str) -> None:
    _refused(build_tar([Member(name, "file", data=b"x")]), tmp_path, UnsafeEntry)


def test_hardlink_target_outside(tmp_path: Path) -> None:
    tar = build_tar([Member("a", "hardlink", target="../../etc/shadow")])
    _refused(tar, tmp_path, UnsafeEntry)


def test_absurd_size_in_header(tmp_path: Path) -> None:
    # base-256 size of 2**60 bytes
    tar = _set_field(ONE_FILE, 0, 124, b"\x80" + (1 << 60).to_bytes(11, "big"))
    _refused(tar, tmp_path, LayerTooLarge)


def test_absurd_pax_size(tmp_path: Path) -> None:
    # a PAX header claiming 2**50 bytes of data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.pax_headers = {"size": str(1 << 50)}
        tf.addfile(ti)
    _refused(buf.getvalue(), tmp_path, LayerTooLarge)


def test_bad_octal_field(tmp_path: Path) -> None:
    tar = _set_field(ONE_FILE, 0, 108, b"12z4567\0")  # uid
    _refused(tar, tmp_path, TarFormatError)


@pytest.mark.parametrize("typ", [b"S", b"V", b"A"])
def test_unsupported_member_types(tmp_path: Path, typ: bytes) -> None:
    _refused(_set_field(ONE_FILE, 0, 156, typ), tmp_path, TarFormatError)


def test_hardlink_to_missing_or_to_a_directory(tmp_path: Path) -> None:
    _refused(build_tar([Member("a", "hardlink", target="nope")]), tmp_path, TarFormatError)
    tar = build_tar([Member("d", "dir"), Member("a", "hardlink", target="d")])
    _refused(tar, tmp_path, TarFormatError)


def test_parent_is_not_a_directory(tmp_path: Path) -> None:
    tar = build_tar([Member("f", "file"), Member("f/x", "file")])
    _refused(tar, tmp_path, UnsafeEntry)
    tar = build_tar([Member("l", "symlink", target="/etc"), Member("l/passwd", "file")])
    _refused(tar, tmp_path, UnsafeEntry)


@pytest.mark.parametrize("name", ["d/.wh..", "d/.wh.", "d/.wh.."])
def test_whiteout_naming_nothing(tmp_path: Path, name: str) -> None:
    _refused(build_tar([Member(name, "file")]), tmp_path, UnsafeEntry)


def test_bad_pax_record(tmp_path: Path) -> None:
    good = build_tar([Member("f", "file", xattrs={"user.a": "b"})])
    # The PAX data block follows the first header: corrupt its length prefix.
    at = good.index(b"SCHILY") - 3
    bad = good[:at] + b"9" + good[at + 1 :]
    _refused(bad, tmp_path, TarFormatError)


def test_accepted_layer_through_a_pipe(tmp_path: Path) -> None:
    """Non-seekable input; names normalised (absolute, ./); later members win."""
    members = [
        Member("/abs", "dir", mode=0o755),
        Member("/abs/f", "file", data=b"one"),
        Member("./abs/./g", "file", data=os.urandom(3 << 20)),
        Member("abs/f", "file", data=b"two"),  # replaces the first abs/f
        Member("abs", "dir", mode=0o700),  # re-listing keeps the children
        Member("d", "file", data=b"file first"),
        Member("d", "dir"),  # a directory replaces the file
        Member("d/l", "symlink", target="../abs/f"),
        Member("x/.wh.gone", "file"),
    ]
    tar = build_tar(members)
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(tar)

    t = threading.Thread(target=feed)
    t.start()
    with os.fdopen(r, "rb") as stream:
        stats = convert_tar(stream, tmp_path / "img")
    t.join()
    assert stats.tar_bytes <= len(tar)
    assert stats.whiteouts == 1 and stats.files == 4
    tree = extract_image(tmp_path / "img", tmp_path / "x")
    assert (tmp_path / "x/abs/f").read_bytes() == b"two"
    assert tree["abs/g"][0] == "file" and tree["d"][0] == "dir"
    assert tree["d/l"] == ("symlink", "", "../abs/f")
    assert tree["x/gone"][0] == "chr"
    assert sorted(tree) == ["", "abs", "abs/f", "abs/g", "d", "d/l", "x", "x/gone"]


def test_end_without_zero_blocks_is_accepted(tmp_path: Path) -> None:
    # header and two data records; no end-of-archive blocks
    stats = convert_tar(io.BytesIO(ONE_FILE[:1536]), tmp_path / "img")
    assert stats.files == 1 and stats.data_bytes == 700


def test_existing_image_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "img"
    target.write_bytes(b"old")
    _refused_here = tmp_path / "out"
    _refused_here.mkdir()
    with pytest.raises(TruncatedTar):
        convert_tar(io.BytesIO(ONE_FILE[:700]), target)
    assert target.read_bytes() == b"old"  # a failed conversion leaves the old image
    convert_tar(io.BytesIO(ONE_FILE), target)
    assert target.stat().st_size > 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "out"]


def test_xattrs_erofs_cannot_hold_are_counted_not_fatal(tmp_path: Path) -> None:
    tar = build_tar(
        [
            Member(
                "f",
                "file",
                xattrs={"user.ok": "1", "system.nfs4_acl": "x", "user.big": "v" * 70000},
            ),
            Member("g", "file", xattrs={"user.ok": "1"}),
        ]
    )
    stats = convert_tar(io.BytesIO(tar), tmp_path / "img")
    assert stats.dropped_xattrs == 2
    assert stats.shared_xattrs == 1  # user.ok=1 on two inodes is stored once


def test_digest_is_the_sha256_of_the_whole_stream(tmp_path: Path) -> None:
    tar = build_tar([Member("f", "file", data=os.urandom(2 << 20)), Member("g", "file")])
    (tmp_path / "l.tar").write_bytes(tar)
    with (tmp_path / "l.tar").open("rb") as f:
        stats = convert_tar(f, tmp_path / "img", digest=True)
    assert stats.tar_digest == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert stats.tar_bytes == len(tar)
    assert convert_tar(io.BytesIO(tar), tmp_path / "img2").tar_digest == ""
    # Same content whether data was copied in the kernel or hashed on the way.
    assert (tmp_path / "img").read_bytes()[4096:] == (tmp_path / "img2").read_bytes()[4096:]


def test_extended_header_then_end_is_truncated(tmp_path: Path) -> None:
    tar = build_tar([Member("f", "file", xattrs={"user.a": "b"})])
    pax_only = tar[:1024]  # the PAX header and its record, no member header after it
    _refused(pax_only, tmp_path, TruncatedTar)
    _refused(pax_only + bytes(1024), tmp_path, TruncatedTar)


def test_libarchive_xattrs(tmp_path: Path) -> None:
    stats = convert_tar(io.BytesIO(libarchive_tar()), tmp_path / "img")
    assert stats.dropped_xattrs == 0 and stats.files == 1
    image = (tmp_path / "img").read_bytes()
    assert b"with space\x00\xffbin" in image  # name suffix then value, in one xattr entry


def test_libarchive_bad_base64(tmp_path: Path) -> None:
    tar = libarchive_tar().replace(b"AP9iaW4", b"A*9iaW4")
    _refused(tar, tmp_path, TarFormatError)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_truncated_large_member_of_a_tar_file(tmp_path: Path, compression: str) -> None:
    """A tar *file* cut inside a large member (the kernel-copy path) is refused too."""
    tar = build_tar([Member("big", "file", data=os.urandom(3 << 20))])
    (tmp_path / "cut.tar").write_bytes(tar[: 2 << 20])
    out = tmp_path / "out"
    out.mkdir()
    with (tmp_path / "cut.tar").open("rb") as f, pytest.raises(TruncatedTar):
        convert_tar(f, out / "img", compression=compression)
    assert list(out.iterdir()) == []


def test_large_members_from_a_file_and_from_a_stream_agree(tmp_path: Path) -> None:
    zeros_then_data = bytes(5 << 20) + os.urandom(3 << 20) + bytes(100)
    tar = build_tar([Member("a", "file", data=zeros_then_data), Member("b", "file", data=b"b")])
    (tmp_path / "l.tar").write_bytes(tar)
    with (tmp_path / "l.tar").open("rb") as f:
        convert_tar(f, tmp_path / "from-file", uuid=bytes(16))
    convert_tar(io.BytesIO(tar), tmp_path / "from-stream", uuid=bytes(16))
    assert (tmp_path / "from-file").read_bytes() == (tmp_path / "from-stream").read_bytes()
    # The stream path left the leading zero MiBs as holes.
    assert (tmp_path / "from-stream").stat().st_blocks * 512 < (6 << 20)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_failed_data_write_fails_the_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """Data is written on a background thread; its errors must still reach the caller."""
    import types

    from stratasnap.erofs import compressed_writer, datawriter
    from stratasnap.errors import SnapshotError

    def broken_pwrite(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    fake_os = types.SimpleNamespace(**{**vars(os), "pwrite": broken_pwrite})
    monkeypatch.setattr(datawriter, "os", fake_os)
    monkeypatch.setattr(compressed_writer, "os", fake_os)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SnapshotError, match="Input/output error"):
        tar = build_tar([Member("f", "file", data=b"x" * 5000)])
        convert_tar(io.BytesIO(tar), out / "i", compression=compression)
    assert list(out.iterdir()) == []


def test_wrapped_file_streams_are_read_not_copied_by_descriptor(tmp_path: Path) -> None:
    """gzip.GzipFile answers fileno() with the compressed file's descriptor: never use it."""
    tar = build_tar([Member("big", "file", data=os.urandom(1 << 20))])
    (tmp_path / "l.tar.gz").write_bytes(gzip.compress(tar))
    with gzip.open(tmp_path / "l.tar.gz", "rb") as f:
        convert_tar(cast(BinaryIO, f), tmp_path / "from-gzip", uuid=bytes(16))
    convert_tar(io.BytesIO(tar), tmp_path / "from-bytes", uuid=bytes(16))
    assert (tmp_path / "from-gzip").read_bytes() == (tmp_path / "from-bytes").read_bytes()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_same_tar_same_uuid_same_image(tmp_path: Path, compression: str) -> None:
    tar = build_tar(
        [
            Member("a/b/c", "file", data=b"x" * 9000, mtime=1_650_000_000),
            Member("a/b/d", "file", data=os.urandom(9000) + b"y" * 9000),
            Member("a/l", "symlink", target="b/c", mtime=1_700_000_001),
            Member("z", "dir", xattrs={"user.x": "1"}),
        ]
    )
    first = convert_tar(io.BytesIO(tar), tmp_path / "1", uuid=b"u" * 16, compression=compression)
    convert_tar(io.BytesIO(tar), tmp_path / "2", uuid=b"u" * 16, compression=compression)
    assert (tmp_path / "1").read_bytes() == (tmp_path / "2").read_bytes()
    assert first.image_bytes == (tmp_path / "1").stat().st_size


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    members=layers(),
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 1 << 16)),
    fix_checksums=st.booleans(),
    compression=st.sampled_from(COMPRESSIONS),
)
def test_mangled_tars_are_converted_or_refused_never_crash(
    members: list[Member],
    flips: list[tuple[int, int]],
    cut: int | None,
    fix_checksums: bool,
    compression: str,
    tmp_path: Path,
) -> None:
    """Random byte flips and cuts: either a valid image or a TarFormatError, nothing else.

    With ``fix_checksums`` the headers' checksums are made right again after the
    flips, so the mangled fields get past the checksum into the parser.
    """
    tar = bytearray(build_tar(members))
    headers = [at for at in range(0, len(tar), 512) if _checksum_ok(tar, at)]
    for at, value in flips:
        tar[at % len(tar)] = value
    if fix_checksums:
        for at in headers:
            tar[at : at + 512] = _set_field(bytes(tar[at : at + 512]), 0, 148, b"        ")
    data = bytes(tar[:cut] if cut is not None else tar)
    out = tmp_path / f"out-{os.urandom(4).hex()}"
    out.mkdir()
    try:
        convert_tar(io.BytesIO(data), out / "img", compression=compression)
    except TarFormatError:
        assert list(out.iterdir()) == []
        return
    if shutil.which("fsck.erofs"):
        r = subprocess.run(["fsck.erofs", str(out / "img")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
