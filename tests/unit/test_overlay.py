"""The overlay backend without mounting: options, the mounts it hands out, labels, errors.

Nothing here needs root: prepare and commit only make directories, and the
mounts are checked as values (the privileged tests apply them, and run the
conformance mixin, whose cases without mounts run without root too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stratasnap import open_snapshotter
from stratasnap.backends.overlay import UPPERDIR_LABEL, OverlaySnapshotter
from stratasnap.backends.overlay_options import MAX_SIZE_LABEL, OverlayOptions
from stratasnap.errors import InvalidArgument, NotFound
from stratasnap.fs.overlay_probe import escape_layer_path, supports_index_option
from stratasnap.types import Kind, Mount


@pytest.fixture
def sn(scratch: Path) -> Iterator[OverlaySnapshotter]:
    s = open_snapshotter(scratch / "root", "overlay")
    assert isinstance(s, OverlaySnapshotter)
    try:
        yield s
    finally:
        s.close()


def _fs(sn: OverlaySnapshotter, key: str) -> str:
    with sn._store.read() as tx:
        return str(sn.storage_dir(tx.get(key).id) / "fs")


def _layer_chain(sn: OverlaySnapshotter, n: int) -> list[str]:
    parent = ""
    for i in range(n):
        sn.prepare(f"l{i}-a", parent)
        sn.commit(f"l{i}", f"l{i}-a")
        parent = f"l{i}"
    return [f"l{i}" for i in range(n)]


def test_registered_backend(scratch: Path) -> None:
    with open_snapshotter(scratch / "r", "overlay") as s:
        assert type(s).backend_name == "overlay"
        assert "rebase" in type(s).capabilities
        # On this (root, 6.x) machine the instance offers what containerd's overlayfs does.
        assert s.capabilities == ("rebase", "remap-ids", "only-remap-ids")
    with open_snapshotter(scratch / "r2", "overlay", slow_chown=True) as s:
        assert s.capabilities == ("rebase", "remap-ids")


def test_layout_of_active_view_and_committed(sn: OverlaySnapshotter) -> None:
    sn.prepare("a")
    storage = Path(_fs(sn, "a")).parent
    assert sorted(os.listdir(storage)) == ["fs", "work"]
    assert oct(os.stat(storage / "fs").st_mode & 0o7777) == oct(0o755)
    sn.commit("c", "a")
    sn.view("v", "c")
    assert os.listdir(Path(_fs(sn, "v")).parent) == ["fs"]  # a view has no work dir


def test_mounts_without_parent_are_binds(sn: OverlaySnapshotter) -> None:
    assert sn.prepare("a") == [Mount("bind", _fs(sn, "a"), ("rw", "rbind"))]
    assert sn.view("v", "") == [Mount("bind", _fs(sn, "v"), ("ro", "rbind"))]


def test_view_of_one_parent_binds_the_parent(sn: OverlaySnapshotter) -> None:
    _layer_chain(sn, 1)
    assert sn.view("v", "l0") == [Mount("bind", _fs(sn, "l0"), ("ro", "rbind"))]


def test_active_on_parents_is_an_overlay_nearest_parent_first(sn: OverlaySnapshotter) -> None:
    names = _layer_chain(sn, 3)
    [m] = sn.prepare("top", "l2")
    assert (m.type, m.source) == ("overlay", "overlay")
    storage = Path(_fs(sn, "top")).parent
    opts = list(m.options)
    assert opts[:3] == [
        f"workdir={storage / 'work'}",
        f"upperdir={storage / 'fs'}",
        "lowerdir=" + ":".join(_fs(sn, n) for n in reversed(names)),
    ]
    assert ("index=off" in opts) == supports_index_option()
    assert sn.mounts("top") == [m]


def test_view_of_several_parents_is_a_lowers_only_overlay(sn: OverlaySnapshotter) -> None:
    _layer_chain(sn, 2)
    [m] = sn.view("v", "l1")
    assert m.type == "overlay"
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in m.options)
    assert "ro" in m.options
    assert f"lowerdir={_fs(sn, 'l1')}:{_fs(sn, 'l0')}" in m.options


def test_configured_mount_options_and_index(scratch: Path) -> None:
    with open_snapshotter(scratch / "r", "overlay", mount_options=["volatile", "index=on"]) as s:
        s.prepare("b-a")
        s.commit("b", "b-a")
        [m] = s.prepare("a", "b")
        assert m.options[-2:] == ("volatile", "index=on")  # ours do not override index
        assert "index=off" not in m.options
    # The command line gives one comma-separated string.
    with open_snapshotter(scratch / "r", "overlay", mount_options="volatile,metacopy=on") as s:
        assert isinstance(s, OverlaySnapshotter)
        assert s.config.mount_options == ("volatile", "metacopy=on")


def test_rebase_keeps_the_upper_and_stacks_it(sn: OverlaySnapshotter) -> None:
    _layer_chain(sn, 1)
    sn.prepare("loose")
    upper = _fs(sn, "loose")
    sn.commit("rebased", "loose", parent="l0")
    [m] = sn.prepare("child", "rebased")
    assert f"lowerdir={upper}:{_fs(sn, 'l0')}" in m.options


def test_paths_with_separators_are_escaped(scratch: Path) -> None:
    assert escape_layer_path("/a:b,c\\d") == "/a\\:b\\,c\\\\d"
    with open_snapshotter(scratch / "odd:root,x", "overlay") as s:
        s.prepare("b-a")
        s.commit("b", "b-a")
        [m] = s.prepare("a", "b")
        lower = next(o for o in m.options if o.startswith("lowerdir="))
        assert "odd\\:root\\,x" in lower


def test_upperdir_label(scratch: Path) -> None:
    with open_snapshotter(scratch / "r", "overlay", upperdir_label=True) as s:
        s.prepare("a", labels={"x": "1"})
        fs = _fs(s, "a")  # type: ignore[arg-type]
        assert dict(s.stat("a").labels) == {"x": "1", UPPERDIR_LABEL: fs}
        [info] = s.walk("labels.x==1")
        assert info.labels[UPPERDIR_LABEL] == fs
        got = s.update(s.stat("a"), ["labels.y"])  # absent: deletes nothing there
        assert got.labels[UPPERDIR_LABEL] == fs
        # Stored labels stay clean: the label is added on the way out only.
        assert list(s.walk(f'labels."{UPPERDIR_LABEL}"')) == []
    with open_snapshotter(scratch / "r", "overlay") as s:
        assert dict(s.stat("a").labels) == {"x": "1"}


def test_sync_remove_off_leaves_storage_for_cleanup(scratch: Path) -> None:
    with open_snapshotter(scratch / "r", "overlay") as s:
        s.prepare("a")
        sid_dir = Path(_fs(s, "a")).parent  # type: ignore[arg-type]
        s.remove("a")
        aside = sid_dir.parent / f"rm-{sid_dir.name}"
        assert not sid_dir.exists() and aside.exists()
        assert s.cleanup().paths == (str(aside),)
        assert not aside.exists()
    with open_snapshotter(scratch / "r2", "overlay", sync_remove="true") as s:
        s.prepare("a")
        s.remove("a")
        assert os.listdir(scratch / "r2" / "snapshots") == []


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"sync_remove": "maybe"}, "sync_remove"),
        ({"upperdir_label": 3}, "upperdir_label"),
        ({"mount_options": 5}, "mount_options"),
        ({"default_size": "ten gigs"}, "default_size"),
        ({"default_size": 1}, "default_size"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_options_are_invalid_argument(
    scratch: Path, options: dict[str, object], word: str
) -> None:
    with pytest.raises(InvalidArgument, match=word):
        open_snapshotter(scratch / "r", "overlay", **options)


def test_size_options_take_units() -> None:
    assert OverlayOptions.take({"default_size": "64MiB"}).default_size == 64 << 20
    assert OverlayOptions.take({"default_size": "2G"}).default_size == 2 << 30
    assert OverlayOptions.take({"default_size": 100_000_000}).default_size == 100_000_000
    assert OverlayOptions.take({"default_size": "0"}).default_size == 0


@pytest.mark.parametrize("value", ["ten", "-5", "1.5", "10G", " 64", "1", "²"])
def test_malformed_max_size_label_creates_nothing(sn: OverlaySnapshotter, value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        sn.prepare("a", labels={MAX_SIZE_LABEL: value})
    assert MAX_SIZE_LABEL in str(err.value) and repr(value) in str(err.value)
    with pytest.raises(NotFound):
        sn.stat("a")
    assert os.listdir(sn.snapshots_dir) == []


def test_max_size_zero_means_unlimited(sn: OverlaySnapshotter) -> None:
    sn.prepare("a", labels={MAX_SIZE_LABEL: "0"})
    assert sorted(os.listdir(Path(_fs(sn, "a")).parent)) == ["fs", "work"]
    assert sn.stat("a").kind is Kind.ACTIVE


def test_mapping_labels_without_idmapped_layers(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Linux 5.19: refused, unless slow_chown lets containerd chown the layers."""
    from stratasnap.backends import overlay
    from stratasnap.backends.overlay_idmap import GIDMAP_LABEL, UIDMAP_LABEL
    from stratasnap.errors import FailedPrecondition

    monkeypatch.setattr(overlay, "idmapped_layers_supported", lambda *_: False)
    # Root maps to our own ids: the upper's chown then works without root too.
    mapped = {UIDMAP_LABEL: f"0:{os.getuid()}:1", GIDMAP_LABEL: f"0:{os.getgid()}:1"}
    with open_snapshotter(scratch / "r", "overlay") as s:
        with pytest.raises(FailedPrecondition, match="slow_chown"):
            s.prepare("a", labels=mapped)
        assert list(s.walk()) == []
    with open_snapshotter(scratch / "r", "overlay", slow_chown=True) as s:
        [m] = s.prepare("a", labels=mapped)
        assert not any(o.startswith(("uidmap=", "gidmap=")) for o in m.options)


def test_containerd_snippet_advertises_what_an_instance_would() -> None:
    import tomllib

    from stratasnap.server.config import containerd_snippet, load_config

    def caps(**options: object) -> list[str]:
        cfg = load_config(None, root="/r", address="/s.sock", backend="overlay", options=options)
        plugin = tomllib.loads(containerd_snippet(cfg))["proxy_plugins"]["stratasnap"]
        found: list[str] = plugin["capabilities"]
        return found

    assert caps() == ["rebase", "remap-ids", "only-remap-ids"]
    assert caps(slow_chown=True) == ["rebase", "remap-ids"]
