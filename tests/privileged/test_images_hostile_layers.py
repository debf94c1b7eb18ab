"""Hostile second layers on every backend (an overlay upper resolves names through its
lowerdirs): refused, the good first layer kept, nothing written outside."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import need_root
from e2e.hostile import HOSTILE, entry
from e2e.oci import Layer, write_oci_archive

from stratasnap import InvalidArgument, open_snapshotter
from stratasnap.backends import BACKENDS
from stratasnap.images.archive import import_archive
from stratasnap.images.store import ImageStore

CASES: dict[str, Callable[[], bytes]] = {
    **{name: make for name, make in HOSTILE.items() if name != "huge-header"},
    # The symlink is in the lower layer: only a lookup through the lowerdirs sees it.
    "lower-symlink-parent": lambda: Layer().raw(entry("evil/escaped"), b"x").tar(),
}


# What a converted layer (erofs) holds harmlessly: the converter makes names relative
# (as containerd's applier does) and writes an image of its own, where a lower
# layer's symlink is shadowed, never followed. Entry by entry, these are refused.
CONVERTED_HARMLESSLY = ("absolute", "lower-symlink-parent")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_second_layer(
    backend: str, case: str, scratch: Path, store_root: Callable[[str], Path]
) -> None:
    need_root()
    base = Layer().dir("etc").file("etc/ok", "ok").symlink("evil", str(scratch / "outside"))
    (scratch / "outside").mkdir()
    archive = scratch / "img.tar"
    info = write_oci_archive(archive, "example.com/h:1", [base, CASES[case]()])
    root = store_root(backend)
    with open_snapshotter(root, backend) as sn:
        store = ImageStore(root, sn)
        (imp,) = import_archive(archive, store.content)
        img = store.load(store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, "", ""))
        if getattr(sn, "converts_layers", False) and case in CONVERTED_HARMLESSLY:
            store.unpack(img)
            assert sorted(i.name for i in sn.walk()) == sorted(info.chain_ids[:2])
        else:
            with pytest.raises(InvalidArgument):
                store.unpack(img)
            sn.cleanup()
            assert [i.name for i in sn.walk()] == [info.chain_ids[0]]
            assert len(os.listdir(root / "snapshots")) == 1
        store.close()
    assert os.listdir(scratch / "outside") == []
    assert not (scratch / "escaped").exists()
