"""The image verbs on the command line (native backend, no root): import, ls, inspect, rm,
diff; docker save archives; the backend hook for whole layers; errors a user can act on."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from e2e.oci import Layer, write_oci_archive

from stratasnap import open_snapshotter
from stratasnap.backends.native import NativeSnapshotter
from stratasnap.cli import cli
from stratasnap.images.archive import import_archive
from stratasnap.images.content import DigestMismatch
from stratasnap.images.reference import Digest
from stratasnap.images.store import ImageStore
from stratasnap.images.unpack import LayerBlob


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
    assert out == [{"name": "example.com/app:1", "digest": info.manifest_digest}]
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


class _Hooked(NativeSnapshotter):
    """A backend that takes whole layers itself (as an erofs converter would)."""

    backend_name = "native"
    seen: list[LayerBlob]
    answer: str = ""

    def apply_layer(self, key: str, blob: LayerBlob) -> Digest | None:
        self.seen.append(blob)
        target = Path(self.mounts(key)[0].source)
        (target / "by-hook").write_text(str(blob.digest))
        return Digest("sha256", self.answer) if self.answer else blob.diff_id


def test_backend_hook_takes_whole_layers(scratch: Path) -> None:
    archive = scratch / "img.tar"
    info = write_oci_archive(archive, "example.com/h:1", [Layer().file("a", "a")])
    root = scratch / "root"
    sn = _Hooked(root)
    sn.seen = []
    store = ImageStore(root, sn)
    (imp,) = import_archive(archive, store.content)
    img = store.load(store.add(imp.name, imp.manifest.digest, imp.manifest.media_type, "", ""))
    sn.answer = "0" * 64  # a hook that writes the wrong content is caught
    with pytest.raises(DigestMismatch):
        store.unpack(img)
    assert list(sn.walk()) == []
    sn.answer = ""
    store.unpack(img)
    assert [str(b.digest) for b in sn.seen] == [info.layer_digests[0]] * 2
    assert sn.seen[0].path.is_file() and sn.seen[0].compression == "gzip"
    view = Path(sn.view("v", img.top_layer)[0].source)
    assert (view / "by-hook").exists() and not (view / "a").exists()
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
