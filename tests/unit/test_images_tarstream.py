"""The layer tar reader agrees with tarfile on what tarfile writes, in every format."""

from __future__ import annotations

import io
import tarfile

import pytest

from stratasnap.errors import InvalidArgument, Unimplemented
from stratasnap.images.tarstream import TarReader


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
        data = reader.read_data(e.size) if e.is_reg else b""
        assert e.mtime_ns == 1_700_000_000 * 10**9
        got.append((e.name.rstrip("/"), e.type, e.mode, e.uid, e.gid, e.linkname, data, e.devmajor))
    assert got == want


def test_pax_xattrs_and_fractional_mtime() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("f")
        ti.pax_headers = {"SCHILY.xattr.user.k": "v\udcff", "mtime": "12.5"}
        t.addfile(ti)
    (e,) = list(TarReader(io.BytesIO(buf.getvalue())))
    assert e.xattrs == {"user.k": b"v\xff"}
    assert e.mtime_ns == 12_500_000_000


def test_corrupt_and_unsupported() -> None:
    raw = bytearray(_archive(tarfile.GNU_FORMAT))
    raw[600] ^= 0xFF  # inside the second header
    with pytest.raises(InvalidArgument, match="checksum"):
        list(TarReader(io.BytesIO(bytes(raw))))
    with pytest.raises(InvalidArgument, match="truncated"):
        r = TarReader(io.BytesIO(_archive(tarfile.PAX_FORMAT)[:1500]))
        for e in r:
            r.read_data(e.size)
    with pytest.raises(InvalidArgument, match="not a tar"):
        list(TarReader(io.BytesIO(b"hello" * 200)))
    sparse = tarfile.TarInfo("s")
    sparse.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(Unimplemented, match="sparse"):
        list(TarReader(io.BytesIO(sparse.tobuf(tarfile.GNU_FORMAT) + bytes(1024))))
