"""containerd 1.6 with stratasnap as its proxy snapshotter, for every Linux backend.

Each backend gets its own stratasnap server and containerd (``stack``), and
the tests run in file order on it: import and unpack the test image, run
containers from it, drive ``ctr snapshots``, restart each daemon, then
remove everything and check containerd's garbage collection emptied our
store. Needs root, containerd, ctr, runc and its shim (skips without them,
fails under CI=true).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from .harness import CommandFailed, Stack, mounts_below
from .oci import ImageInfo
from .testimage import IMAGE, INDEX, LAYER_FILES, LOOK, SEEN

pytestmark = pytest.mark.e2e


class Row(NamedTuple):
    parent: str
    kind: str


def ctr_ls(stack: Stack) -> dict[str, Row]:
    """``ctr snapshots ls`` as {key: (parent, kind)}."""
    rows = {}
    for line in stack.snapshots("ls").stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) == 2:
            fields.insert(1, "")
        key, parent, kind = fields
        rows[key] = Row(parent, kind)
    return rows


def backend_ls(stack: Stack) -> list[dict[str, object]]:
    """Our store, read by our CLI (``stratasnap --root … ls --json``)."""
    found: list[dict[str, object]] = json.loads(stack.stratasnap("ls", "--json").stdout)
    return found


def backend_key(stack: Stack, key: str) -> str:
    """The key containerd gave our backend for its snapshot ``key`` (``<ns>/<seq>/<key>``)."""
    matches = [
        str(s["name"])
        for s in backend_ls(stack)
        if str(s["name"]).startswith(f"{stack.namespace}/")
        and str(s["name"]).split("/", 2)[2] == key
    ]
    assert len(matches) == 1, f"backend keys for {key!r}: {matches}"
    return matches[0]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def run_in_container(stack: Stack, cid: str, script: str) -> str:
    return stack.ctr(
        "run", "--rm", "--snapshotter", stack.snapshotter, IMAGE, cid, "/bin/sh", "-c", script
    ).stdout


def mount_printed(stack: Stack, target: Path, key: str) -> str:
    """Mount snapshot ``key`` at ``target`` by running what ``ctr snapshots mounts`` prints."""
    target.mkdir(parents=True, exist_ok=True)
    printed = stack.snapshots("mounts", str(target), key).stdout
    lines = [line for line in printed.splitlines() if line.strip()]
    assert lines and all(line.startswith("mount ") for line in lines), printed
    for line in lines:
        stack.run(shlex.split(line))
    return printed


def umount(stack: Stack, target: Path) -> None:
    stack.run(["umount", str(target)])


@pytest.fixture
def imported(stack: Stack, image: tuple[Path, ImageInfo]) -> ImageInfo:
    """The test image, imported and unpacked onto stratasnap (imports it if it is not)."""
    path, info = image
    if IMAGE not in stack.ctr("images", "ls", "-q").stdout.split():
        out = stack.ctr(
            "images",
            "import",
            "--snapshotter",
            stack.snapshotter,
            "--index-name",
            INDEX,
            str(path),
        ).stdout
        assert f"unpacking {IMAGE} ({info.manifest_digest})...done" in out, out
    return info


# -- import and unpack -------------------------------------------------------------------


def test_import_unpacks_the_layers_onto_stratasnap(stack: Stack, imported: ImageInfo) -> None:
    assert {IMAGE, INDEX} <= set(stack.ctr("images", "ls", "-q").stdout.split())

    # containerd's view: one committed snapshot per layer, named by chain id, chained.
    rows = ctr_ls(stack)
    chain = imported.chain_ids
    for i, cid in enumerate(chain):
        assert cid in rows, f"layer {i + 1} ({cid}) not unpacked onto stratasnap: {rows}"
        assert rows[cid] == Row(chain[i - 1] if i else "", "Committed")

    # Ours: the same chain under the keys containerd made (<namespace>/<seq>/<chain id>).
    ours = {str(s["name"]).split("/", 2)[2]: s for s in backend_ls(stack)}
    for i, cid in enumerate(chain):
        s = ours[cid]
        assert str(s["name"]).startswith(f"{stack.namespace}/")
        assert s["kind"] == "committed"
        parent = str(s["parent"])
        assert (parent.split("/", 2)[2] if parent else "") == (chain[i - 1] if i else "")


# -- containers --------------------------------------------------------------------------


def test_a_container_sees_the_layers_with_whiteouts_applied(
    stack: Stack, imported: ImageInfo
) -> None:
    out = run_in_container(stack, "e2e-layers", f"{LOOK}; echo written > /tmp/w && cat /tmp/w")
    assert out.splitlines() == [*SEEN, "written"]

    # --rm: the container and its active snapshot are gone.
    assert stack.ctr("containers", "ls", "-q").stdout.split() == []
    assert "e2e-layers" not in ctr_ls(stack)


def test_the_image_command_runs(stack: Stack, imported: ImageInfo) -> None:
    out = stack.ctr("run", "--rm", "--snapshotter", stack.snapshotter, IMAGE, "e2e-cmd").stdout
    assert {"bin", "data", "lib", "newdir", "opaque"} <= set(out.split())


# -- ctr snapshots -----------------------------------------------------------------------


def test_ctr_snapshots_verbs(stack: Stack, imported: ImageInfo) -> None:
    try:
        check_ctr_snapshots_verbs(stack, imported)
    finally:
        # Whatever failed: leave no GC root behind (it would keep the image's layers).
        for key in ("e2e-view", "e2e-layer", "e2e-work"):
            stack.snapshots("rm", key, check=False)


def check_ctr_snapshots_verbs(stack: Stack, imported: ImageInfo) -> None:
    chain = imported.chain_ids
    top = chain[-1]
    mnt = stack.base / "mnt"

    # prepare, mount what `mounts` prints, write, commit.
    stack.snapshots("prepare", "e2e-work", top)
    printed = mount_printed(stack, mnt, "e2e-work")
    assert str(stack.ss_root) in printed
    try:
        assert (mnt / "data" / "keep.txt").read_text() == LAYER_FILES["/data/keep.txt"] + "\n"
        assert not (mnt / "data" / "gone.txt").exists()
        (mnt / "hello.txt").write_text("hello from e2e\n")
    finally:
        umount(stack, mnt)
    usage = stack.snapshots("usage", "e2e-work").stdout.splitlines()
    assert usage[0].split() == ["KEY", "SIZE", "INODES"] and usage[1].split()[0] == "e2e-work"
    assert int(usage[1].split()[-1]) > 0
    stack.snapshots("commit", "e2e-layer", "e2e-work")

    # view: read-only, sees the committed file and the layers below.
    stack.snapshots("view", "e2e-view", "e2e-layer")
    printed = mount_printed(stack, mnt, "e2e-view")
    for line in printed.splitlines():
        argv = shlex.split(line)
        options = argv[argv.index("-o") + 1].split(",") if "-o" in argv else []
        # Read-only: "ro", or an overlay without an upper directory.
        overlay_ro = "overlay" in argv and not any(o.startswith("upperdir=") for o in options)
        assert "ro" in options or overlay_ro, printed
    try:
        assert (mnt / "hello.txt").read_text() == "hello from e2e\n"
        assert (mnt / "opaque" / "new.txt").exists()
        assert not (mnt / "opaque" / "old1.txt").exists()
        with pytest.raises(OSError):
            (mnt / "nope.txt").write_text("x")
    finally:
        umount(stack, mnt)

    # ls and info: kinds and parents.
    rows = ctr_ls(stack)
    assert "e2e-work" not in rows
    assert rows["e2e-layer"] == Row(top, "Committed")
    assert rows["e2e-view"] == Row("e2e-layer", "View")
    info = json.loads(stack.snapshots("info", "e2e-view").stdout)
    assert (info["Kind"], info["Name"], info["Parent"]) == ("View", "e2e-view", "e2e-layer")
    info = json.loads(stack.snapshots("info", chain[0]).stdout)
    assert (info["Kind"], info.get("Parent", "")) == ("Committed", "")

    # tree: each snapshot one level under its parent.
    tree = stack.snapshots("tree").stdout.splitlines()
    order = [*chain, "e2e-layer", "e2e-view"]
    lines = [next(i for i, line in enumerate(tree) if line.strip(" \\_") == k) for k in order]
    assert lines == sorted(lines), tree
    depth = [len(tree[i]) - len(tree[i].lstrip(" \\_")) for i in lines]
    assert depth == sorted(depth) and len(set(depth)) == len(depth), tree

    # label: containerd keeps every label; ours get only containerd.io/snapshot/* ones.
    stack.snapshots("label", "e2e-layer", "containerd.io/snapshot/e2e=yes", "e2e.plain=1")
    labels = json.loads(stack.snapshots("info", "e2e-layer").stdout)["Labels"]
    assert labels["containerd.io/snapshot/e2e"] == "yes" and labels["e2e.plain"] == "1"
    key = backend_key(stack, "e2e-layer")
    ours = json.loads(stack.stratasnap("info", key).stdout)
    assert ours["labels"] == {"containerd.io/snapshot/e2e": "yes"}
    stack.snapshots("label", "e2e-layer", "containerd.io/snapshot/e2e=")
    labels = json.loads(stack.snapshots("info", "e2e-layer").stdout).get("Labels", {})
    assert "containerd.io/snapshot/e2e" not in labels and labels["e2e.plain"] == "1"
    assert json.loads(stack.stratasnap("info", key).stdout).get("labels", {}) == {}

    # usage: every layer has bytes and inodes.
    usages = {
        f[0]: f[1:] for f in (line.split() for line in stack.snapshots("usage").stdout.splitlines())
    }
    for cid in chain:
        assert cid in usages, usages
        assert int(usages[cid][-1]) > 0 and not usages[cid][0].startswith("0"), usages[cid]

    # rm: gone from containerd at once (our store loses them at the next GC).
    stack.snapshots("rm", "e2e-view")
    stack.snapshots("rm", "e2e-layer")
    rows = ctr_ls(stack)
    assert "e2e-view" not in rows and "e2e-layer" not in rows
    with pytest.raises(CommandFailed):
        stack.snapshots("info", "e2e-layer")


# -- restarts ----------------------------------------------------------------------------


def test_a_containerd_restart_keeps_image_and_snapshots(stack: Stack, imported: ImageInfo) -> None:
    before = ctr_ls(stack)
    stack.restart_containerd()
    assert IMAGE in stack.ctr("images", "ls", "-q").stdout.split()
    assert ctr_ls(stack) == before
    out = run_in_container(stack, "e2e-after-restart", "cat /data/keep.txt")
    assert out == LAYER_FILES["/data/keep.txt"] + "\n"


def test_a_stratasnap_restart_under_a_running_containerd(stack: Stack, imported: ImageInfo) -> None:
    before = ctr_ls(stack)
    status = stack.stratasnapd.stop()
    assert status == 0, f"stratasnap exited with {status} on SIGTERM:\n{stack.log_tails()}"
    assert not stack.ss_socket.exists(), "a cleanly stopped server removes its socket"
    stack.stratasnapd.start()

    def answers() -> bool:  # containerd's proxy reconnects with a backoff (<= 3 s)
        return stack.snapshots("ls", check=False).returncode == 0

    wait_for("containerd to reach stratasnap again", answers, timeout=20)
    assert ctr_ls(stack) == before
    out = run_in_container(stack, "e2e-after-ss-restart", "cat /opaque/new.txt")
    assert out == LAYER_FILES["/opaque/new.txt"] + "\n"


# -- garbage collection ------------------------------------------------------------------


def test_gc_removes_our_snapshots_and_storage(stack: Stack, imported: ImageInfo) -> None:
    assert backend_ls(stack), "nothing in our store before GC?"
    for cid in stack.ctr("containers", "ls", "-q").stdout.split():
        stack.ctr("containers", "rm", cid)
    for lease in stack.ctr("leases", "ls", "-q").stdout.split():
        stack.ctr("leases", "rm", lease)

    # Snapshots made by hand (a failed test may leave some) are GC roots: unroot them.
    # (Not rm: containerd 1.6 refuses to remove a parent whose child its GC collected,
    # "cannot remove snapshot with child", as it never drops the child's entry.)
    for key in ctr_ls(stack):
        if key not in imported.chain_ids:
            stack.snapshots("label", key, "containerd.io/gc.root=", check=False)
    stack.ctr("images", "rm", "--sync", IMAGE, INDEX)
    assert stack.ctr("images", "ls", "-q").stdout.split() == []

    wait_for("containerd to forget the snapshots", lambda: ctr_ls(stack) == {}, timeout=30)
    # Remove, then Cleanup, from containerd's GC: no snapshot directory is left.
    wait_for(
        f"an empty {stack.ss_root / 'snapshots'} (left: {stack.storage_entries()})",
        lambda: stack.storage_entries() == [],
        timeout=30,
    )
    assert backend_ls(stack) == []
    log = stack.stratasnapd.log.read_text()
    assert "method=Remove" in log and "method=Cleanup" in log


def test_nothing_is_left_mounted_below_the_stack(stack: Stack) -> None:
    left = [Path(m) for m in mounts_below(stack.base) if m not in stack.own_mounts]
    if stack.backend == "erofs":
        # A committed layer's image stays mounted at snapshots/<id>/fs while the layer
        # exists (tests run in random order: the GC may not have run yet).
        layers = stack.ss_root / "snapshots"
        left = [
            m
            for m in left
            if not (
                m.name == "fs" and m.parent.parent == layers and (m.parent / "layer.erofs").exists()
            )
        ]
    assert left == []
