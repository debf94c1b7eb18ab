"""The image verbs on the command line (native backend, no root): import, ls, inspect, rm,
diff; docker save archives; the backend hook for whole layers; errors a user can act on."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

import pytest
from click.testing import CliRunner
from e2e.oci import Layer, write_oci_archive

from stratasnap import open_snapshotter
from stratasnap.backends.native import NativeSnapshotter
from stratasnap.cli import cli
from stratasnap.images.archive import import_archive
from stratasnap.images.content import DigestMismatch
from stratasnap.images.store import Image, ImageStore


def _run(root: Path, *args: str, code: int = 0) -> str:
    r = CliRunner().invoke(cli, ["--root", str(root), *args], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r.output


def test_import_ls_inspect_diff_rm(scratch: Path) -> None:
    archive = scratch / "img.tar"
    info = write_oci_archive(
        archive,
        "example.com/app:1",
        [Layer().dir("etc").file("etc/a", "a"), Layer().file("b", "b")],
    )
    root = scratch / "root"
    out = json.loads(_run(root, "image", "import", "--json", str(archive)))
    assert out == [
        {
            "name": "example.com/app:1",
            "digest": info.manifest_digest,
            # native: applied file by file
            "layers": 2,
            "unpacked": 2,
            "converted": 0,
        }
    ]
    (row,) = json.loads(_run(root, "image", "ls", "--json"))
    assert row["name"] == "example.com/app:1" and row["platform"].startswith("linux/")
    assert "example.com/app:1" in _run(root, "image", "ls")
    doc = json.loads(_run(root, "image", "inspect", "example.com/app:1"))
    assert [layer["chainID"] for layer in doc["layers"]] == info.chain_ids
    assert all(layer["unpacked"] for layer in doc["layers"])
    assert doc["snapshot"] == info.chain_ids[-1]
    # A writable snapshot on the image, changed, then turned into a layer.
    _run(root, "prepare", "work", info.chain_ids[-1])
    with open_snapshotter(root) as sn:
        src = Path(sn.mounts("work")[0].source)
    (src / "etc" / "a").unlink()
    (src / "new").write_text("new")
    layer_file = scratch / "layer.tar.zst"
    desc = json.loads(
        _run(root, "diff", "work", "-o", str(layer_file), "--compression", "zstd", "--json")
    )
    data = layer_file.read_bytes()
    assert desc["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert desc["mediaType"].endswith("+zstd")
    import zstandard

    with tarfile.open(fileobj=io.BytesIO(zstandard.decompress(data, 1 << 24))) as t:
        assert sorted(t.getnames()) == ["etc/.wh.a", "new"]
    # Unknown names are NotFound (exit 4) with a hint; rm leaves the container's layers.
    err = _run(root, "image", "inspect", "nope", code=4)
    assert "image ls" in err
    _run(root, "image", "rm", "example.com/app:1")
    assert json.loads(_run(root, "image", "ls", "--json")) == []
    _run(root, "rm", "work")
    _run(root, "image", "rm", "example.com/app:1", code=4)


def test_docker_save_archive(scratch: Path) -> None:
    layer = Layer().dir("etc").file("etc/hostname", "box\n").tar()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    manifest = json.dumps(
        [{"Config": "cfg.json", "RepoTags": ["busybox:test"], "Layers": ["abc/layer.tar"]}]
    ).encode()
    archive = scratch / "save.tar"
    with tarfile.open(archive, "w") as t:
        for name, data in (
            ("manifest.json", manifest),
            ("cfg.json", config),
            ("abc/layer.tar", layer),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    root = scratch / "root"
    with open_snapshotter(root) as sn:
        store = ImageStore(root, sn)
        (imp,) = import_archive(archive, store.content)
        assert imp.name == "docker.io/library/busybox:test"
        rec = store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, imp.platform, "")
        img = store.load(rec)
        store.unpack(img)
        assert img.top_layer == diff_id
        view = Path(sn.view("v", diff_id)[0].source)
        assert (view / "etc" / "hostname").read_text() == "box\n"
        store.close()


class _Converting(NativeSnapshotter):
    """A backend that takes whole layer tars itself (as the erofs backend's converter does).

    It records what it was handed and writes one marker file instead of the
    layer's entries, so the tests see which path each layer took.
    """

    backend_name = "native"
    on = True
    lie = ""  # a diff ID to answer instead of the real one
    seen: list[bytes]

    @property
    def converts_layers(self) -> bool:
        return self.on

    def convert_layer(self, key: str, tar: BinaryIO) -> str:
        data = tar.read()
        self.seen.append(data)
        target = Path(self.mounts(key)[0].source)
        (target / "converted").write_bytes(data)
        return self.lie or "sha256:" + hashlib.sha256(data).hexdigest()


def _converting_store(scratch: Path, **archive: object) -> tuple[_Converting, ImageStore, Image]:
    layers = [Layer().file("a", "a"), Layer().file("b", "b")]
    path = scratch / "img.tar"
    write_oci_archive(path, "example.com/h:1", layers, **archive)  # type: ignore[arg-type]
    root = scratch / "root"
    sn = _Converting(root)
    sn.seen = []
    store = ImageStore(root, sn)
    (imp,) = import_archive(path, store.content)
    img = store.load(store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, "", ""))
    return sn, store, img


def _names(tar: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return tf.getnames()


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_a_converting_backend_gets_the_verified_uncompressed_tars(
    scratch: Path, compression: str
) -> None:
    sn, store, img = _converting_store(scratch, compress=compression)
    stats = store.unpack(img)
    assert (stats.applied, stats.converted) == (2, 2)
    # Each layer handed over whole and uncompressed: a tar whose digest is the diff ID.
    assert ["sha256:" + hashlib.sha256(t).hexdigest() for t in sn.seen] == [
        str(d) for d in img.config.diff_ids
    ]
    assert [_names(t) for t in sn.seen] == [["a"], ["b"]]
    view = Path(sn.view("v", img.top_layer)[0].source)
    assert (view / "converted").read_bytes() == sn.seen[1]
    assert not (view / "a").exists()  # not applied file by file as well
    store.close()
    sn.close()


def test_a_converting_backend_that_says_no_gets_the_generic_applier(scratch: Path) -> None:
    sn, store, img = _converting_store(scratch)
    sn.on = False
    stats = store.unpack(img)
    assert (stats.applied, stats.converted) == (2, 0)
    assert sn.seen == []
    view = Path(sn.view("v", img.top_layer)[0].source)
    assert sorted(os.listdir(view)) == ["a", "b"]
    store.close()
    sn.close()


def test_converted_layers_are_checked_against_the_config(scratch: Path) -> None:
    sn, store, img = _converting_store(scratch, compress="none")
    sn.lie = "sha256:" + "0" * 64  # a backend that converted something else is caught
    with pytest.raises(DigestMismatch, match=r"diff ID sha256:0+ \(as converted by the backend\)"):
        store.unpack(img)
    assert list(sn.walk()) == []  # nothing committed, the snapshot removed
    sn.lie = ""
    # A tampered blob (a valid tar still): its digest is checked on what the backend read.
    blob = store.content.path(img.manifest.layers[1].digest)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # in the end-of-archive padding
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        store.unpack(img)
    assert [i.name for i in sn.walk()] == [str(img.config.diff_ids[0])]  # layer 1 only
    store.close()
    sn.close()


def test_import_killed_mid_unpack_then_repeated(scratch: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from e2e.oci import generated_layers

    archive = scratch / "big.tar"
    info = write_oci_archive(archive, "example.com/big:1", generated_layers(2, 1500, 20_000))
    root = scratch / "root"
    cmd = [sys.executable, "-m", "stratasnap", "--root", str(root), "image", "import", str(archive)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_active = False
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if (root / "metadata.db").exists():
            with open_snapshotter(root) as sn:
                if any(True for _ in sn.walk("kind==active")):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_active = True
                    break
        time.sleep(0.02)
    proc.wait()
    assert killed_active, "the import finished before it could be killed mid-layer"
    # Run again: the abandoned layer snapshot is removed, the image completes.
    _run(root, "image", "import", str(archive))
    with open_snapshotter(root) as sn:
        assert {i.name for i in sn.walk()} == set(info.chain_ids)
        assert sn.cleanup() is not None


def test_import_layout_dir_names(scratch: Path) -> None:
    layout = scratch / "layout"
    write_oci_archive(layout, "example.com/named:7", [Layer().file("f", "f")], layout_dir=True)
    index = json.loads((layout / "index.json").read_text())
    root = scratch / "root"
    # The containerd annotation names the image.
    assert "example.com/named:7" in _run(root, "image", "import", str(layout))
    # Only a bare tag: the name comes from --name, and without it the error says so.
    del index["manifests"][0]["annotations"]["io.containerd.image.name"]
    (layout / "index.json").write_text(json.dumps(index))
    assert "name it with --name" in _run(root, "image", "import", str(layout), code=3)
    out = _run(root, "image", "import", str(layout), "--name", "registry.local/app", "--json")
    assert json.loads(out)[0]["name"] == "registry.local/app:7"
    empty = scratch / "empty"
    empty.mkdir()
    assert "neither an OCI image layout" in _run(root, "image", "import", str(empty), code=3)
