"""The shared layer tar reader (stratasnap.tarstream): it agrees with tarfile on what
tarfile writes, in every format, and refuses what layers must not hold."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from stratasnap.errors import InvalidArgument, Unimplemented
from stratasnap.tarstream import REG, TarReader, UnsafeEntry, split_name


def _archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:

        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object) -> None:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.size = len(data)
            ti.mtime = 1_700_000_000
            for k, v in kw.items():
                setattr(ti, k, v)
            t.addfile(ti, io.BytesIO(data) if data else None)

        add("dir", tarfile.DIRTYPE, mode=0o755)
        add("dir/" + "long-name-" * 20, data=b"x" * 1000, mode=0o4755)
        add("dir/" + "d" * 120 + "/f", data=b"prefix")  # ustar splits it into prefix/name
        add("big-ids", data=b"1", uid=3_000_000, gid=70_000)
        add("link-" + "l" * 120, tarfile.SYMTYPE, linkname="t" * 150)
        add("hard", tarfile.LNKTYPE, linkname="big-ids")
        add("dev", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        add("empty")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_matches_tarfile(fmt: int) -> None:
    raw = _archive(fmt)
    want = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as t:
        for ti in t:
            data = t.extractfile(ti).read() if ti.isreg() else b""  # type: ignore[union-attr]
            want.append(
                (
                    ti.name,
                    ti.type,
                    ti.mode,
                    ti.uid,
                    ti.gid,
                    ti.linkname,
                    data,
                    ti.devmajor if ti.ischr() else 0,
                )
            )
    got = []
    reader = TarReader(io.BytesIO(raw))
    for e in reader:
        data = reader.read(e.size) if e.type == REG else b""
        assert e.mtime_ns == 1_700_000_000 * 10**9
        name, link = e.name.decode().rstrip("/"), e.linkname.decode()
        got.append((name, e.type, e.mode, e.uid, e.gid, link, data, e.devmajor))
    assert got == want


def test_pax_xattrs_and_fractional_mtime() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("f")
        ti.pax_headers = {"SCHILY.xattr.user.k": "v\udcff", "mtime": "12.5"}
        t.addfile(ti)
    (e,) = list(TarReader(io.BytesIO(buf.getvalue())))
    assert e.xattrs == ((b"user.k", b"v\xff"),)
    assert e.mtime_ns == 12_500_000_000


def test_corrupt_and_unsupported() -> None:
    raw = bytearray(_archive(tarfile.GNU_FORMAT))
    raw[600] ^= 0xFF  # inside the second header
    with pytest.raises(InvalidArgument, match="checksum"):
        list(TarReader(io.BytesIO(bytes(raw))))
    with pytest.raises(InvalidArgument, match="truncated"):
        r = TarReader(io.BytesIO(_archive(tarfile.PAX_FORMAT)[:1500]))
        for e in r:
            r.read(e.size)
    with pytest.raises(InvalidArgument, match="not a tar"):
        list(TarReader(io.BytesIO(b"hello" * 200)))
    sparse = tarfile.TarInfo("s")
    sparse.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(Unimplemented, match="sparse"):
        list(TarReader(io.BytesIO(sparse.tobuf(tarfile.GNU_FORMAT) + bytes(1024))))


def test_names_one_rule() -> None:
    assert split_name(b"/./a//b/./c/", 0) == (b"a", b"b", b"c")
    assert split_name(b"./", 0) == ()
    for bad in (b"../x", b"a/../../x", b"a/..", b"a\0b", b"d/" + b"n" * 256):
        with pytest.raises(UnsafeEntry):
            split_name(bad, 7)


def test_pax_global_header_is_skipped_not_applied() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.pax_headers = {"uid": "4242", "path": "everything"}
        t.addfile(tarfile.TarInfo("f"))
    (e,) = list(TarReader(io.BytesIO(buf.getvalue())))
    assert (e.name, e.uid) == (b"f", 0)


def test_header_only_members_carry_no_data() -> None:
    # A symlink whose size field says 512: Go (and containerd) read no data for it.
    link = tarfile.TarInfo("l")
    link.type, link.linkname = tarfile.SYMTYPE, "t"
    block = bytearray(link.tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = b"%011o\0" % 512
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    after = tarfile.TarInfo("after").tobuf(tarfile.USTAR_FORMAT)
    names = [(e.name, e.size) for e in TarReader(io.BytesIO(bytes(block) + after + bytes(1024)))]
    assert names == [(b"l", 0), (b"after", 0)]


def test_checksum_over_high_bytes_unsigned_and_signed() -> None:
    # The checksum is summed in C (adler32 halves): names of high bytes must still add
    # up, and the signed sums some old writers stored must still be accepted.
    ti = tarfile.TarInfo("ü" * 40 + "/\xff")
    ti.mode = 0o755
    good = bytearray(ti.tobuf(tarfile.GNU_FORMAT, encoding="latin-1"))
    high = sum(1 for i, b in enumerate(good) if b & 0x80 and not 148 <= i < 156)
    assert high > 40
    (e,) = list(TarReader(io.BytesIO(bytes(good) + bytes(1024))))
    assert e.name == ("ü" * 40 + "/\xff").encode("latin-1")
    signed = bytearray(good)
    signed[148:156] = b" " * 8
    signed[148:156] = b"%06o\0 " % (sum(signed) - 256 * high)
    assert signed != good
    assert len(list(TarReader(io.BytesIO(bytes(signed) + bytes(1024))))) == 1
    off_by_one = bytearray(good)
    off_by_one[10] ^= 1
    with pytest.raises(InvalidArgument, match="checksum"):
        list(TarReader(io.BytesIO(bytes(off_by_one) + bytes(1024))))


def test_compressed_input_is_named_but_a_name_like_its_magic_is_not_refused() -> None:
    gz = gzip.compress(_archive(tarfile.GNU_FORMAT))
    with pytest.raises(InvalidArgument, match="gzip-compressed; decompress it first"):
        list(TarReader(io.BytesIO(gz)))
    # bzip2's magic is "BZh": a tar whose first member is named so is still a tar.
    raw = tarfile.TarInfo("BZh91AY&SY").tobuf(tarfile.GNU_FORMAT) + bytes(1024)
    assert [e.name for e in TarReader(io.BytesIO(raw))] == [b"BZh91AY&SY"]
