"""``image pull``/``import`` on the erofs backend: layers converted straight to images.

Real registry (Debian's docker-registry), real mounts, roots on tmpfs. Which
path a layer took is read from outside: a logging ``mkfs.erofs`` first on
PATH (``counting_mkfs``) says whether any commit built an image from an upper,
and ``--json`` says how many layers the backend converted. The rootfs is
compared with the same image pulled on the native backend (the generic
applier: a separate implementation of the whiteout rules).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import need_root
from erofs_layers import counting_mkfs

from stratasnap import Kind, open_snapshotter
from stratasnap.backends.erofs import IMAGE
from stratasnap.cli import cli
from stratasnap.images.content import DigestMismatch
from stratasnap.images.pull import PullOptions, pull
from stratasnap.images.store import ImageStore
from stratasnap.testing import mounted

from .oci import Layer, write_oci_archive
from .registry import LocalRegistry, push
from .test_images_pull import _need_tools
from .tree import Listing, listing

CONVERTING = ("-o", "compression=none")  # what the converter writes today


def _layers() -> list[Layer]:
    """Whiteouts across layers: a file, a hard-link target, a directory made opaque."""
    return [
        Layer()
        .dirs("etc")
        .file("etc/os-release", "ID=test\n")
        .file("etc/keep", "one\n")
        .dirs("d/sub")
        .file("d/old", "old")
        .file("d/sub/deep", "deep")
        .dirs("usr/bin")
        .file("usr/bin/a", os.urandom(20_000), 0o755)
        .hardlink("usr/bin/a-link", "usr/bin/a")
        .symlink("usr/bin/b", "a"),
        Layer()
        .whiteout("etc/os-release")
        .dir("d", 0o750)
        .opaque("d")
        .file("d/new", "new", 0o600, owner=(1000, 1000))
        .dirs("usr/bin")
        .file("usr/bin/tool", os.urandom(50_000), 0o755),
        Layer().dirs("usr/bin").whiteout("usr/bin/a").dirs("etc").file("etc/keep", "two\n"),
    ]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    _need_tools()
    with LocalRegistry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture
def mkfs_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    need_root()
    log = counting_mkfs(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    return log


def _builds(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if f"/{IMAGE} " in line)


def _cli(root: Path, options: tuple[str, ...], *args: str, code: int = 0) -> str:
    r = CliRunner().invoke(cli, ["--root", str(root), "--backend", "erofs", *options, *args])
    assert r.exit_code == code, r.output
    return r.output


def _rootfs(root: Path, ref: str, mnt: Path, backend: str = "erofs") -> Listing:
    """The image's rootfs as mounted from a view of its top layer (dirs' mtimes aside)."""
    options = {"compression": "none"} if backend == "erofs" else {}
    mnt.mkdir(exist_ok=True)
    with open_snapshotter(root, backend, **options) as sn:
        store = ImageStore(root, sn)
        top = store.get(ref).top_layer
        with mounted(sn.view("check", top), mnt) as r:
            tree = listing(r)
        sn.remove("check")
        store.close()
    return tree


def _native_rootfs(scratch: Path, ref: str, options: PullOptions) -> Listing:
    root = scratch / "native"
    with open_snapshotter(root, "native") as sn:
        store = ImageStore(root, sn)
        pull(store, ref, options)
        store.close()
    return _rootfs(root, ref, scratch / "mnt-native", "native")


def _leftovers(root: Path) -> list[str]:
    return [n for n in os.listdir(root / "snapshots") if not n.isdigit()]


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_pull_converts_each_layer_and_the_rootfs_is_right(
    registry: LocalRegistry, scratch: Path, mkfs_log: Path, compress: str
) -> None:
    ref = f"{registry.address}/erofs/{compress}:1"
    layout = scratch / "layout"
    write_oci_archive(layout, ref, _layers(), compress=compress, layout_dir=True)
    push(layout, ref)
    root = scratch / "root"
    out = json.loads(_cli(root, CONVERTING, "image", "pull", "--plain-http", "--json", ref))
    assert (out["layers"], out["unpacked"], out["converted"]) == (3, 3, 3)
    assert _builds(mkfs_log) == 0  # no commit built an image from an upper
    tree = _rootfs(root, ref, scratch / "mnt")
    want = _native_rootfs(scratch, ref, PullOptions(plain_http=True))
    assert tree == want
    # Spelled out, the rules the comparison covers:
    assert "etc/os-release" not in tree and "usr/bin/a" not in tree
    assert sorted(p for p in tree if p.startswith("d/")) == ["d/new"]  # opaque
    assert tree["d"]["mode"] == 0o750 and tree["d/new"]["uid"] == 1000
    assert tree["usr/bin/a-link"]["size"] == 20_000
    assert _leftovers(root) == []
    # Again: every layer is there, none converted or built.
    again = json.loads(_cli(root, CONVERTING, "image", "pull", "--plain-http", "--json", ref))
    assert (again["unpacked"], again["converted"]) == (0, 0)


def test_convert_layers_false_takes_the_upper_and_mkfs(
    registry: LocalRegistry, scratch: Path, mkfs_log: Path
) -> None:
    ref = f"{registry.address}/erofs/mkfs:1"
    layout = scratch / "layout"
    write_oci_archive(layout, ref, _layers(), layout_dir=True)
    push(layout, ref)
    root = scratch / "root"
    options = (*CONVERTING, "-o", "convert_layers=false")
    out = json.loads(_cli(root, options, "image", "pull", "--plain-http", "--json", ref))
    assert (out["unpacked"], out["converted"]) == (3, 0)
    assert _builds(mkfs_log) == 3
    # Both ways give the same rootfs.
    converted = scratch / "converted"
    _cli(converted, CONVERTING, "image", "pull", "--plain-http", ref)
    assert _builds(mkfs_log) == 3
    assert _rootfs(root, ref, scratch / "mnt") == _rootfs(converted, ref, scratch / "mnt2")


def test_import_converts_and_a_lying_config_commits_nothing(scratch: Path, mkfs_log: Path) -> None:
    archive = scratch / "img.tar"
    info = write_oci_archive(archive, "example.com/erofs/import:1", _layers())
    root = scratch / "root"
    [out] = json.loads(_cli(root, CONVERTING, "image", "import", "--json", str(archive)))
    assert (out["unpacked"], out["converted"]) == (3, 3)
    assert _builds(mkfs_log) == 0
    tree = _rootfs(root, info.name, scratch / "mnt")
    assert tree["etc/keep"]["size"] == 4 and "etc/os-release" not in tree
    # An image whose config claims another diff ID for its second layer.
    liar = scratch / "liar.tar"
    layers = _layers()
    layers[1].file("extra", "not in the claimed layer")
    true = write_oci_archive(scratch / "true.tar", "example.com/erofs/true:1", layers)
    claimed = [true.diff_ids[0], "sha256:" + "1" * 64, true.diff_ids[2]]
    write_oci_archive(liar, "example.com/erofs/liar:1", layers, claimed_diff_ids=claimed)
    root2 = scratch / "root2"
    said = _cli(root2, CONVERTING, "image", "import", str(liar), code=3)
    assert "diff ID" in said and "1" * 64 in said
    with open_snapshotter(root2, "erofs", compression="none") as sn:
        # Layer 1 stays (another image may share it); layer 2: nothing committed.
        assert [(i.name, i.kind) for i in sn.walk()] == [(true.chain_ids[0], Kind.COMMITTED)]
    assert _leftovers(root2) == []
    assert _builds(mkfs_log) == 0


def test_a_tampered_layer_blob_is_rejected(
    registry: LocalRegistry, scratch: Path, mkfs_log: Path
) -> None:
    ref = f"{registry.address}/erofs/tampered:1"
    layout = scratch / "layout"
    info = write_oci_archive(layout, ref, _layers(), layout_dir=True)
    push(layout, ref)
    root = scratch / "root"
    _cli(root, CONVERTING, "image", "pull", "--plain-http", "--no-unpack", ref)
    with open_snapshotter(root, "erofs", compression="none") as sn:
        store = ImageStore(root, sn)
        img = store.get(ref)
        digest = img.manifest.layers[1].digest
        blob = store.content.path(digest)
        # One byte changed in the tar's end padding, recompressed: a valid gzip of a
        # readable tar, so only the digests tell.
        data = bytearray(gzip.decompress(blob.read_bytes()))
        data[-1] ^= 0xFF
        blob.chmod(0o644)
        blob.write_bytes(gzip.compress(bytes(data)))
        with pytest.raises(DigestMismatch, match=str(digest)):
            store.unpack(img)
        assert [i.name for i in sn.walk()] == [info.chain_ids[0]]
        store.close()
    assert _leftovers(root) == []
    assert _builds(mkfs_log) == 0
