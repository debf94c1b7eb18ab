"""Hostile and broken layers are refused, and nothing of them is left behind."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from e2e.hostile import HOSTILE, entry
from e2e.oci import Layer, write_oci_archive

from stratasnap import InvalidArgument, open_snapshotter
from stratasnap.images.archive import import_archive
from stratasnap.images.content import DigestMismatch
from stratasnap.images.store import ImageStore


def _store(scratch: Path) -> tuple[ImageStore, Path]:
    root = scratch / "root"
    return ImageStore(root, open_snapshotter(root, "native")), root


def _import(store: ImageStore, archive: Path) -> None:
    for imp in import_archive(archive, store.content):
        rec = store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, imp.platform, "")
        store.unpack(store.load(rec))


def _nothing_left(store: ImageStore, root: Path) -> None:
    assert list(store.sn.walk()) == []
    assert os.listdir(root / "snapshots") == []


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layer_rejected(case: str, scratch: Path) -> None:
    outside = scratch / "escaped"
    archive = scratch / "img.tar"
    write_oci_archive(archive, "example.com/hostile:1", [HOSTILE[case]()])
    store, root = _store(scratch)
    with pytest.raises(InvalidArgument):
        _import(store, archive)
    _nothing_left(store, root)
    assert not outside.exists()
    assert not (scratch / "root" / "escaped").exists()


def test_hostile_second_layer_keeps_first(scratch: Path) -> None:
    good = Layer().dir("etc").file("etc/ok", "ok")
    archive = scratch / "img.tar"
    info = write_oci_archive(archive, "example.com/two:1", [good, HOSTILE["dotdot"]()])
    store, _ = _store(scratch)
    with pytest.raises(InvalidArgument):
        _import(store, archive)
    # The good first layer is committed (shared, reusable); the bad one left nothing.
    assert [i.name for i in store.sn.walk()] == [info.chain_ids[0]]


def test_truncated_gzip_rejected(scratch: Path) -> None:
    raw = Layer().dir("d").file("d/big", os.urandom(200_000)).tar()
    archive = scratch / "img.tar"
    info = write_oci_archive(archive, "example.com/trunc:1", [raw])
    # Replace the layer blob by a truncated one with a matching descriptor: the digest
    # then verifies, and only the gzip stream itself is wrong.
    store, root = _store(scratch)
    (imp,) = import_archive(archive, store.content)
    rec = store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, imp.platform, "")
    img = store.load(rec)
    blob = store.content.path(info.layer_digests[0])
    data = blob.read_bytes()
    os.chmod(blob, 0o644)
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArgument, match=r"truncated|digest"):
        store.unpack(img)
    _nothing_left(store, root)


def test_diff_id_mismatch_rejected(scratch: Path) -> None:
    archive = scratch / "img.tar"
    write_oci_archive(archive, "example.com/mm:1", [Layer().file("a", "a")])
    store, root = _store(scratch)
    (imp,) = import_archive(archive, store.content)
    rec = store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, imp.platform, "")
    img = store.load(rec)
    # A layer blob whose bytes were swapped on disk after it was stored.
    blob = store.content.path(img.manifest.layers[0].digest)
    os.chmod(blob, 0o644)
    blob.write_bytes(gzip.compress(Layer().file("b", "b").tar(), mtime=0))
    with pytest.raises(DigestMismatch, match=str(img.manifest.layers[0].digest)):
        store.unpack(img)
    _nothing_left(store, root)


def test_layer_not_a_tar(scratch: Path) -> None:
    archive = scratch / "img.tar"
    write_oci_archive(archive, "example.com/nt:1", [b"not a tar at all" * 100])
    store, root = _store(scratch)
    with pytest.raises(InvalidArgument):
        _import(store, archive)
    _nothing_left(store, root)


def test_symlinked_parent_inside_tree_is_followed(scratch: Path) -> None:
    """usrmerge: ``lib -> usr/lib`` then ``lib/x`` lands in usr/lib (stays inside)."""
    layer = Layer().dirs("usr/lib").symlink("lib", "usr/lib").raw(entry("lib/x"), b"x")
    archive = scratch / "img.tar"
    info = write_oci_archive(archive, "example.com/usrmerge:1", [layer])
    store, root = _store(scratch)
    _import(store, archive)
    (rec,) = [i for i in store.sn.walk() if i.name == info.chain_ids[0]]
    assert rec is not None
    files = [p for p in (root / "snapshots").rglob("x")]
    assert [p.relative_to(root / "snapshots").parts[1:] for p in files] == [("usr", "lib", "x")]
