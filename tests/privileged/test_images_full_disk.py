"""A full disk while unpacking is ResourceExhausted, and nothing is half-committed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import need_root
from e2e.oci import Layer, write_oci_archive

from stratasnap import ResourceExhausted, open_snapshotter
from stratasnap.images.archive import import_archive
from stratasnap.images.store import ImageStore


@pytest.mark.parametrize("backend", ["native", "overlay"])
def test_full_disk_unpack(backend: str, scratch: Path) -> None:
    need_root()
    archive = scratch / "img.tar"
    # Zeros compress to almost nothing: the blobs fit, the unpacked layer does not.
    big = Layer().dir("d")
    for i in range(8):
        big.file(f"d/zeros{i}", bytes(1 << 20))
    write_oci_archive(archive, "example.com/full:1", [Layer().file("small", "s"), big])
    root = scratch / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], check=True)
    try:
        with open_snapshotter(root, backend) as sn:
            store = ImageStore(root, sn)
            (imp,) = import_archive(archive, store.content)
            rec = store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, "", "")
            img = store.load(rec)
            with pytest.raises(ResourceExhausted, match="applying layer"):
                store.unpack(img)
            # The first layer is committed; the second left nothing behind (overlay leaves
            # removed storage to cleanup(), like containerd's overlayfs without sync_remove).
            sn.cleanup()
            assert [i.name for i in sn.walk()] == [str(img.chain_ids[0])]
            assert len(os.listdir(root / "snapshots")) == 1
            store.close()
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
