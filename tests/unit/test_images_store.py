"""References, the content store, image records and their migration, import and rm."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
from e2e.oci import Layer, write_oci_archive

from stratasnap import InvalidArgument, NotFound, open_snapshotter
from stratasnap.images.archive import import_archive
from stratasnap.images.content import ContentStore, DigestMismatch
from stratasnap.images.reference import parse_reference
from stratasnap.images.store import ImageStore
from stratasnap.metastore import SCHEMA_VERSION, MetaStore


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("user/app:1.2", "docker.io/user/app:1.2"),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("localhost:5000/a/b", "localhost:5000/a/b:latest"),
        ("127.0.0.1:5000/x:v1", "127.0.0.1:5000/x:v1"),
        ("quay.io/a/b@sha256:" + "a" * 64, "quay.io/a/b@sha256:" + "a" * 64),
        ("ghcr.io/a/b:t@sha256:" + "b" * 64, "ghcr.io/a/b:t@sha256:" + "b" * 64),
    ],
)
def test_reference_normalised(text: str, want: str) -> None:
    assert str(parse_reference(text)) == want


@pytest.mark.parametrize("bad", ["", "UPPER/case", "a//b", "a:b:c:d", "x@sha256:12", " a"])
def test_reference_invalid(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(bad)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_content_verifies_and_resumes(scratch: Path) -> None:
    cs = ContentStore(scratch / "content")
    data = os.urandom(300_000)
    d = _digest(data)
    # A writer killed halfway leaves a partial file and no blob.
    w = cs.writer(d, len(data))
    w.write(data[:100_000])
    w.close()
    assert not cs.has(d)
    # The next writer resumes from where it stopped (the bytes it has are re-hashed).
    with cs.writer(d, len(data)) as w2:
        assert w2.offset == 100_000
        w2.write(data[100_000:])
    assert cs.path(d).read_bytes() == data
    assert list(cs.ingest.iterdir()) == []
    # Wrong bytes never land under the digest.
    other = os.urandom(10)
    wrong = d[:-4] + "0000"
    with pytest.raises(DigestMismatch, match=wrong), cs.writer(wrong, 10) as w3:
        w3.write(other)
    assert not cs.has(wrong)
    with pytest.raises(DigestMismatch, match="more than"), cs.writer(_digest(b"ab"), 2) as w4:
        w4.write(b"abc")
    assert [str(x) for x in cs.digests()] == [d]


def test_content_gc_keeps_referenced(scratch: Path) -> None:
    cs = ContentStore(scratch / "content")
    a, b = cs.put(b"a"), cs.put(b"b")
    got = cs.gc([a])
    assert cs.has(a) and not cs.has(b)
    assert got.size == 1


def test_schema_v1_store_migrates(scratch: Path) -> None:
    db = scratch / "metadata.db"
    MetaStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE images")
    conn.execute("UPDATE meta SET value = '1' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    ms = MetaStore(db)
    with ms.read() as tx:
        assert tx.images() == []
    ms.close()
    (v,) = sqlite3.connect(db).execute("SELECT value FROM meta").fetchone()
    assert int(v) == SCHEMA_VERSION == 2


def test_import_rm_reclaims(scratch: Path) -> None:
    root = scratch / "root"
    shared = Layer().dir("base").file("base/f", "shared")
    a, b = scratch / "a.tar", scratch / "b.tar"
    ia = write_oci_archive(a, "example.com/a:1", [shared, Layer().file("only-a", "a")])
    ib = write_oci_archive(b, "example.com/b:1", [shared, Layer().file("only-b", "b")])
    with open_snapshotter(root, "native") as sn:
        store = ImageStore(root, sn)
        for archive in (a, b):
            (imp,) = import_archive(archive, store.content)
            rec = store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, "", "")
            store.unpack(store.load(rec))
        assert {i.name for i in sn.walk()} == {*ia.chain_ids, *ib.chain_ids}
        assert store.find("example.com/a:1").digest == ia.manifest_digest
        # A container on image a keeps a's top layer through the rm.
        sn.prepare("ctr", ia.chain_ids[-1])
        store.remove("example.com/a:1")
        with pytest.raises(NotFound):
            store.find("example.com/a:1")
        assert {i.name for i in sn.walk()} == {*ia.chain_ids, *ib.chain_ids, "ctr"}
        assert not store.content.has(ia.layer_digests[1])
        assert store.content.has(ia.layer_digests[0])  # shared with b
        sn.remove("ctr")
        store.gc()
        assert {i.name for i in sn.walk()} == set(ib.chain_ids)
        store.remove("example.com/b:1")
        assert list(sn.walk()) == []
        assert list(store.content.digests()) == []
        store.close()


def test_concurrent_writers_of_one_blob(scratch: Path) -> None:
    import threading
    import time

    cs = ContentStore(scratch / "content")
    data = os.urandom(200_000)
    d = _digest(data)
    first = cs.writer(d, len(data))
    first.write(data[:1000])
    seen: list[bool] = []

    def second() -> None:
        # Waits for the first writer, then finds the blob stored: nothing to write.
        with cs.writer(d, len(data)) as w:
            seen.append(w.already_stored)
            w.restart()
            w.write(data)

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # blocked on the first writer's lock
    with first:
        first.write(data[1000:])
    t.join(10)
    assert seen == [True]
    assert cs.path(d).read_bytes() == data
    assert list(cs.ingest.iterdir()) == []
