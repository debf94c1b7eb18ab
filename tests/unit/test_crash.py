"""Crash safety: a process killed (SIGKILL) between any two steps of an operation.

A child process runs one operation with every storage step (mkdir, rename,
tree copy, delete, metadata commit) counted; it kills itself just before step
N. For every N until the operation finishes untouched, the test then reopens
the store and runs cleanup(), and checks that the operation happened entirely
or not at all, that every snapshot still has its data (committed content is
byte-identical), and that nothing under ``snapshots/`` is left unowned.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stratasnap import Kind, open_snapshotter

CHILD = textwrap.dedent(
    """
    import os, shutil, signal, sys, json
    import stratasnap.metastore as ms
    import stratasnap.backends.native as native
    from stratasnap import open_snapshotter

    root, op, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    count = 0

    def step(name, fn):
        def wrapped(*a, **kw):
            global count
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return wrapped

    sn = open_snapshotter(root)
    os.rename = step("rename", os.rename)
    os.mkdir = step("mkdir", os.mkdir)
    shutil.rmtree = step("rmtree", shutil.rmtree)
    native.copy_tree = step("copy", native.copy_tree)
    ms.MetaStore._commit = step("commit", ms.MetaStore._commit)
    if op == "prepare":
        sn.prepare("child", "base", labels={"l": "1"})
    elif op == "view":
        sn.view("v", "base")
    elif op == "commit":
        sn.commit("child-committed", "active")
    elif op == "remove":
        sn.remove("leaf")
    elif op == "cleanup":
        sn.cleanup()
    print(json.dumps({"steps": count}))
    """
)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def source_of(sn, key: str) -> Path:  # type: ignore[no-untyped-def]
    return Path(sn.mounts(key)[0].source)


def setup_root(root: Path) -> dict[str, str]:
    """base (committed, 3 files) <- leaf (committed); active on base with data."""
    with open_snapshotter(root) as sn:
        src = Path(sn.prepare("base-a")[0].source)
        (src / "dir").mkdir()
        (src / "dir" / "a").write_bytes(b"A" * 5000)
        (src / "b").write_text("bee")
        os.link(src / "b", src / "dir" / "b-link")
        sn.commit("base", "base-a")
        leaf = Path(sn.prepare("leaf-a", "base")[0].source)
        (leaf / "leaf-only").write_text("leaf")
        sn.commit("leaf", "leaf-a")
        act = Path(sn.prepare("active", "base")[0].source)
        (act / "written").write_text("in the active snapshot")
        # Snapshot name -> digest of its content, taken through a view of it.
        digests = {}
        for name in ("base", "leaf"):
            digests[name] = tree_digest(Path(sn.view(f"view-{name}", name)[0].source))
            sn.remove(f"view-{name}")
        digests["active"] = tree_digest(act)
        return digests


def run_child(root: Path, op: str, kill_at: int) -> int | None:
    """Run ``op`` killed at step ``kill_at``; the step count when it finished, else None."""
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), op, str(kill_at)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode == -signal.SIGKILL:
        return None
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["steps"])


def check_consistent(root: Path, digests: dict[str, str]) -> dict[str, Kind]:
    with open_snapshotter(root) as sn:
        sn.cleanup()
        infos = {i.name: i for i in sn.walk()}
        for name, info in infos.items():
            if info.kind is Kind.COMMITTED:
                with_view = sn.view(f"check-{name}", name)
                content = tree_digest(Path(with_view[0].source))
                sn.remove(f"check-{name}")
            else:
                content = tree_digest(source_of(sn, name))
            if name in digests:
                assert content == digests[name], f"content of {name} changed"
            if name == "child-committed":
                assert content == digests["active"]
            if name == "child":
                assert content == digests["base"], "a listed child lacks its parent's copy"
        # Every directory under snapshots/ belongs to a snapshot.
        with sn._store.read() as tx:
            ids = {str(i) for i in tx.id_map()}
        left = set(os.listdir(root / "snapshots"))
        assert left == ids, f"unowned storage left: {sorted(left - ids)}"
        return {n: i.kind for n, i in infos.items()}


@pytest.mark.parametrize(
    ("op", "done"),
    [
        ("prepare", lambda k: k.get("child") is Kind.ACTIVE),
        ("view", lambda k: k.get("v") is Kind.VIEW),
        ("commit", lambda k: k.get("child-committed") is Kind.COMMITTED and "active" not in k),
        ("remove", lambda k: "leaf" not in k),
        ("cleanup", lambda k: True),
    ],
)
def test_kill_at_every_step(op: str, done, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    kill_at = 1
    finished = None
    while finished is None:
        root = scratch / f"{op}-{kill_at}"
        digests = setup_root(root)
        if op == "cleanup":
            # Leftovers of earlier crashes for cleanup to chew on.
            (root / "snapshots" / "new-424242" / "x").mkdir(parents=True)
            (root / "snapshots" / "rm-434343").mkdir()
        finished = run_child(root, op, kill_at)
        kinds = check_consistent(root, digests)
        if finished is not None:
            assert done(kinds), f"{op} finished but its effect is missing: {kinds}"
        else:
            # Killed: what the operation did not touch is all still there.
            assert kinds.get("base") is Kind.COMMITTED
        kill_at += 1
        assert kill_at < 100, "operation never finished"
    print(f"{op}: killed at each of {kill_at - 2} steps")
    assert kill_at > 2, f"{op}: no step was interrupted; the test checks nothing"
