"""erofs backend: a layer tar converted straight into a snapshot's image (convert_layer).

Real mounts, roots on tmpfs (``scratch``). Whether a commit ran mkfs.erofs is
read from a logging ``mkfs.erofs`` put first on PATH (``counting_mkfs``).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from conftest import need_root
from erofs_layers import Member, build_tar, counting_mkfs
from test_erofs_layers import _storage
from test_overlay_layers import _commit_layer, _tree, _view

import stratasnap.erofs
import stratasnap.metastore as ms
from stratasnap import open_snapshotter
from stratasnap.backends.erofs import DIGEST_DETAIL, IMAGE, ErofsSnapshotter
from stratasnap.errors import FailedPrecondition, InvalidArgument, NotFound, SnapshotError
from stratasnap.fs.erofs_image import file_sha256
from stratasnap.fs.mount import is_mountpoint, mounts_under
from stratasnap.testing import mounted

pytestmark = pytest.mark.privileged

#: Over base (a, b, dir/x, dir/z): a new file, a whiteout, an opaque dir, links.
LAYER = [
    Member("n", "file", data=b"new " * 3000),
    Member(".wh.a", "file"),
    Member("dir", "dir", mode=0o750),
    Member("dir/.wh..wh..opq", "file"),
    Member("dir/y", "file", data=b"why"),
    Member("s", "symlink", target="n"),
    Member("h", "hardlink", target="n"),
]
#: The merged view of a child prepared on the converted layer.
MERGED = {
    "b": "bee",
    "dir": "<dir>",
    "dir/y": "why",
    "h": "new " * 3000,
    "n": "new " * 3000,
    "s": "new " * 3000,
}


def _base(root: Path) -> None:
    (root / "a").write_text("ay")
    (root / "b").write_text("bee")
    (root / "dir").mkdir()
    (root / "dir" / "x").write_text("ex")
    (root / "dir" / "z").write_text("zed")


def _builds(log: Path) -> int:
    """How many layer images mkfs.erofs built (not probes)."""
    return sum(1 for line in log.read_text().splitlines() if f"/{IMAGE} " in line)


@pytest.fixture
def mkfs_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = counting_mkfs(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    return log


def _open(root: Path, **options: object) -> ErofsSnapshotter:
    s = open_snapshotter(root, "erofs", **{"compression": "none", **options})
    assert isinstance(s, ErofsSnapshotter)
    return s


@pytest.fixture
def sn(scratch: Path, mkfs_log: Path) -> Iterator[ErofsSnapshotter]:
    need_root()
    s = _open(scratch / "root")
    try:
        _commit_layer(s, scratch, "base", "", _base)
        yield s
    finally:
        s.close()


def _pending(sn: ErofsSnapshotter) -> list[str]:
    return [n for n in os.listdir(sn.snapshots_dir) if n.startswith("new-")]


def test_converted_layer_commits_without_mkfs_and_its_child_shows_it(
    sn: ErofsSnapshotter, scratch: Path, mkfs_log: Path
) -> None:
    assert sn.converts_layers
    before = _builds(mkfs_log)
    assert before == 1  # base, built from its upper
    tar = build_tar(LAYER)
    sn.prepare("l-a", "base")
    diff_id = sn.convert_layer("l-a", cast(BinaryIO, io.BufferedReader(io.BytesIO(tar))))
    assert diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert len(_pending(sn)) == 1  # the image waits in its locked staging dir
    sn.commit("layer", "l-a")
    assert _builds(mkfs_log) == before  # the commit took the converted image
    assert _pending(sn) == []
    storage = _storage(sn, "layer")
    assert sorted(os.listdir(storage)) == ["fs", IMAGE]
    assert is_mountpoint(storage / "fs")
    assert sn.details("layer")[DIGEST_DETAIL] == "sha256:" + file_sha256(storage / IMAGE)
    assert sn.usage("layer").size == os.stat(storage / IMAGE).st_blocks * 512
    # The layer alone keeps its whiteout and opaque marks for overlayfs ...
    assert os.stat(storage / "fs" / "a").st_rdev == 0
    assert os.getxattr(storage / "fs" / "dir", "trusted.overlay.opaque") == b"y"
    assert os.stat(storage / "fs" / "h").st_ino == os.stat(storage / "fs" / "n").st_ino
    # ... which a child prepared on it applies over the parent.
    with mounted(sn.prepare("child", "layer"), scratch) as r:
        assert _tree(r) == MERGED
        assert oct(os.stat(r / "dir").st_mode & 0o7777) == oct(0o750)
        (r / "c").write_text("child")
    sn.commit("child-c", "child")
    assert _view(sn, scratch, "child-c") == {**MERGED, "c": "child"}


def test_a_non_seekable_stream_is_read_once(sn: ErofsSnapshotter, scratch: Path) -> None:
    tar = build_tar(LAYER)
    r_fd, w_fd = os.pipe()
    sn.prepare("l-a", "base")

    def feed() -> None:
        with os.fdopen(w_fd, "wb") as w:
            w.write(tar)

    feeder = threading.Thread(target=feed)
    feeder.start()
    with os.fdopen(r_fd, "rb") as r:
        diff_id = sn.convert_layer("l-a", r)
    feeder.join()
    assert diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    sn.commit("layer", "l-a")
    assert _view(sn, scratch, "layer") == MERGED


@pytest.mark.parametrize(
    ("setup", "error", "match"),
    [
        ("missing", NotFound, "nope"),
        ("committed", FailedPrecondition, "not active"),
        ("view", FailedPrecondition, "not active"),
        ("written", FailedPrecondition, "has files in its upper"),
        ("converted", FailedPrecondition, "has a converted layer already"),
        ("bad-tar", InvalidArgument, None),
        ("truncated-tar", InvalidArgument, None),
        ("unsafe-tar", InvalidArgument, r"\.\."),
    ],
)
def test_errors_leave_nothing_and_the_snapshot_as_it_was(
    sn: ErofsSnapshotter, scratch: Path, setup: str, error: type[SnapshotError], match: str | None
) -> None:
    tar = build_tar(LAYER)
    key = {"missing": "nope", "committed": "base", "view": "v"}.get(setup, "l-a")
    if setup == "view":
        sn.view("v", "base")
    elif setup not in ("missing", "committed"):
        with mounted(sn.prepare("l-a", "base"), scratch) as r:
            if setup == "written":
                (r / "w").write_text("written")
    if setup == "converted":
        sn.convert_layer("l-a", io.BytesIO(build_tar([Member("first", "file", data=b"1")])))
    elif setup == "bad-tar":
        tar = b"\x01" * 1024
    elif setup == "truncated-tar":
        tar = tar[: len(tar) // 2]
    elif setup == "unsafe-tar":
        tar = build_tar([Member("../escape", "file", data=b"x")])
    staged = set(_pending(sn))
    with pytest.raises(error, match=match):
        sn.convert_layer(key, io.BytesIO(tar))
    assert set(_pending(sn)) == staged  # nothing converted left behind
    if key in ("l-a", "v"):
        assert not os.path.lexists(_storage(sn, key) / IMAGE)
    if key == "l-a":
        # The snapshot goes on as it was: its commit holds what was there before.
        sn.commit("after", "l-a")
        want = {
            "written": {**_base_tree(), "w": "written"},
            "converted": {**_base_tree(), "first": "1"},
        }.get(setup, _base_tree())
        assert _view(sn, scratch, "after") == want
    assert _pending(sn) == []


def _base_tree() -> dict[str, str]:
    return {"a": "ay", "b": "bee", "dir": "<dir>", "dir/x": "ex", "dir/z": "zed"}


@pytest.mark.parametrize(
    ("options", "match"),
    [({"convert_layers": "false"}, "convert_layers=false"), ({"compression": "lz4hc"}, "lz4hc")],
)
def test_off_when_the_option_or_the_compression_says_so(
    scratch: Path,
    mkfs_log: Path,
    options: dict[str, object],
    match: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    need_root()
    # As on a host whose liblz4 is missing or too old for lz4hc: the converter
    # does not offer it, mkfs.erofs still builds such layers.
    monkeypatch.setattr(stratasnap.erofs, "COMPRESSIONS", ("none", "lz4"))
    with _open(scratch / "root", **options) as s:
        assert not s.converts_layers
        s.prepare("a")
        with pytest.raises(FailedPrecondition, match=match):
            s.convert_layer("a", io.BytesIO(build_tar(LAYER)))
        assert _pending(s) == []


def test_writes_after_the_conversion_are_refused_at_commit(
    sn: ErofsSnapshotter, scratch: Path, mkfs_log: Path
) -> None:
    mounts = sn.prepare("l-a", "base")
    sn.convert_layer("l-a", io.BytesIO(build_tar(LAYER)))
    with mounted(mounts, scratch) as r:
        (r / "late").write_text("written after")
    with pytest.raises(FailedPrecondition, match="written after its layer was converted"):
        sn.commit("layer", "l-a")
    assert sn.stat("l-a").kind.value == "active"
    assert len(_pending(sn)) == 1  # still waiting: neither the writes nor the layer lost
    with mounted(mounts, scratch) as r:
        (r / "late").unlink()  # the upper is empty again
    sn.commit("layer", "l-a")
    assert _view(sn, scratch, "layer") == MERGED
    assert _builds(mkfs_log) == 1


def test_a_failed_store_commit_keeps_the_conversion_pending(
    sn: ErofsSnapshotter, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sn.prepare("l-a", "base")
    sn.convert_layer("l-a", io.BytesIO(build_tar(LAYER)))
    real = ms.WriteTx.commit_active

    def fail_once(self: ms.WriteTx, *a: object, **kw: object) -> object:
        monkeypatch.setattr(ms.WriteTx, "commit_active", real)
        raise OSError(5, "injected I/O error")

    monkeypatch.setattr(ms.WriteTx, "commit_active", fail_once)
    with pytest.raises(OSError, match="injected"):
        sn.commit("layer", "l-a")
    assert sn.stat("l-a").kind.value == "active"
    assert not os.path.lexists(_storage(sn, "l-a") / IMAGE)  # no spare image
    sn.commit("layer", "l-a")
    assert _view(sn, scratch, "layer") == MERGED


def test_remove_and_close_drop_a_pending_conversion(scratch: Path, mkfs_log: Path) -> None:
    need_root()
    root = scratch / "root"
    with _open(root, sync_remove=True) as s:
        s.prepare("a")
        s.convert_layer("a", io.BytesIO(build_tar(LAYER)))
        s.remove("a")
        assert _pending(s) == []
        s.prepare("b")
        s.convert_layer("b", io.BytesIO(build_tar(LAYER)))
        assert len(_pending(s)) == 1
    assert [n for n in os.listdir(root / "snapshots") if n.startswith("new-")] == []
    with _open(root) as s:  # reopened: b is as it was, empty and active
        s.commit("b-c", "b")
        assert _view(s, scratch, "b-c") == {}


def test_a_limited_upper_takes_a_converted_layer(scratch: Path, mkfs_log: Path) -> None:
    need_root()
    with _open(scratch / "root", default_size="64MiB") as s:
        _commit_layer(s, scratch, "base", "", _base)
        s.prepare("l-a", "base")
        s.convert_layer("l-a", io.BytesIO(build_tar(LAYER)))
        s.commit("layer", "l-a")
        assert sorted(os.listdir(_storage(s, "layer"))) == ["fs", IMAGE]
        assert _view(s, scratch, "layer") == MERGED
        assert _builds(mkfs_log) == 1


class _GatedTar(io.RawIOBase):
    """A tar that stalls after its first block until ``go`` is set."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = memoryview(data)
        self.started = threading.Event()
        self.go = threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: object) -> int:
        view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        if self.started.is_set():
            assert self.go.wait(30)
        self.started.set()
        n = min(len(view), len(self._data), 512)
        view[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def test_a_commit_waits_for_a_conversion_of_its_snapshot(
    sn: ErofsSnapshotter, scratch: Path, mkfs_log: Path
) -> None:
    sn.prepare("l-a", "base")
    tar = _GatedTar(build_tar(LAYER))
    results: dict[str, object] = {}

    def run(name: str, fn: object) -> None:
        try:
            results[name] = fn()  # type: ignore[operator]
        except BaseException as exc:
            results[name] = exc

    converter = threading.Thread(
        target=run, args=("convert", lambda: sn.convert_layer("l-a", cast(BinaryIO, tar)))
    )
    converter.start()
    assert tar.started.wait(30)
    second = threading.Thread(
        target=run, args=("again", lambda: sn.convert_layer("l-a", io.BytesIO(build_tar([]))))
    )
    committer = threading.Thread(target=run, args=("commit", lambda: sn.commit("layer", "l-a")))
    second.start()
    committer.start()
    committer.join(0.5)
    assert committer.is_alive() and second.is_alive()  # both wait for the conversion
    tar.go.set()
    for t in (converter, second, committer):
        t.join(60)
    assert isinstance(results["convert"], str), results
    assert results["commit"] is None, results
    # The second conversion came after the first (refused) or after the commit (gone).
    assert isinstance(results["again"], FailedPrecondition | NotFound), results
    assert _view(sn, scratch, "layer") == MERGED
    assert _builds(mkfs_log) == 1
    assert mounts_under(_storage(sn, "layer")) == [_storage(sn, "layer") / "fs"]
