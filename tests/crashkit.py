"""Crash safety, for any backend: a process killed (SIGKILL) between any two steps.

A child process runs one operation with every storage step (mkdir, rename,
tree delete, metadata commit, and the backend's own steps: a tree copy, a
subvolume ioctl) counted; it kills itself just before step N. For every N
until the operation finishes untouched, :func:`kill_at_every_step` reopens
the store, runs cleanup(), and checks that the operation happened entirely
or not at all, that every snapshot still has its data (committed content is
byte-identical), that active snapshots are writable, and that nothing under
``snapshots/`` is left unowned.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stratasnap import Kind, open_snapshotter
from stratasnap.snapshotter import BaseSnapshotter

CHILD = textwrap.dedent(
    """
    import functools, importlib, json, os, signal, sys
    from stratasnap import open_snapshotter

    root, op_code, kill_at, backend, options, steps = sys.argv[1:7]
    argv = sys.argv[7:]  # a scenario's own arguments, for its operations
    kill_at = int(kill_at)
    count = 0

    def step(fn):
        def wrapped(*a, **kw):
            global count
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return wrapped

    sn = open_snapshotter(root, backend, **json.loads(options))
    for spec in json.loads(steps):
        module, _, path = spec.partition(":")
        *owner_path, name = path.split(".")
        owner = functools.reduce(getattr, owner_path, importlib.import_module(module))
        setattr(owner, name, step(getattr(owner, name)))
    exec(op_code, {"sn": sn, "argv": argv})
    print(json.dumps({"steps": count}))
    """
)

#: Storage steps every backend takes, counted (and killed before) in the child:
#: ``module:attribute``, the attribute may be dotted (a method of a class).
COMMON_STEPS = (
    "os:rename",
    "os:mkdir",
    "shutil:rmtree",
    "stratasnap.metastore:MetaStore._commit",
)
#: Each backend's own steps besides.
BACKEND_STEPS: dict[str, tuple[str, ...]] = {
    "native": ("stratasnap.backends.native:copy_tree",),
    "btrfs": tuple(
        f"stratasnap.fs.btrfs:{name}"
        for name in ("snapshot", "create_subvolume", "set_readonly", "sync", "destroy_subvolume")
    ),
}

#: How the child runs each operation: Python with ``sn`` (the open snapshotter)
#: and ``argv`` (the scenario's own arguments).
OP_CODE: dict[str, str] = {
    "prepare": 'sn.prepare("child", "base", labels={"l": "1"})',
    "view": 'sn.view("v", "base")',
    "commit": 'sn.commit("child-committed", "active")',
    "remove": 'sn.remove("leaf")',
    "cleanup": "sn.cleanup()",
}

#: Each operation and how to tell, from the kinds of the snapshots left, that it happened.
OPS: dict[str, Callable[[dict[str, Kind]], bool]] = {
    "prepare": lambda k: k.get("child") is Kind.ACTIVE,
    "view": lambda k: k.get("v") is Kind.VIEW,
    "commit": lambda k: k.get("child-committed") is Kind.COMMITTED and "active" not in k,
    "remove": lambda k: "leaf" not in k,
    "cleanup": lambda k: True,
}


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def source_of(sn: BaseSnapshotter, key: str) -> Path:
    return Path(sn.mounts(key)[0].source)


class CrashRun:
    """The crash scenario for one backend (with its options) under one base directory.

    A backend whose snapshots need more than this scenario (real mounts to
    write through, checks of its own storage) subclasses it: ``steps``,
    ``op_code``, :meth:`setup_root`, :meth:`check_consistent`,
    :meth:`child_args` and :meth:`release` are the hooks.
    """

    #: What the child's operations may run (see OP_CODE).
    op_code: Mapping[str, str] = OP_CODE

    def __init__(self, base: Path, backend: str, options: Mapping[str, object] | None = None):
        self.base = base
        self.backend = backend
        self.options = dict(options or {})

    @property
    def steps(self) -> tuple[str, ...]:
        """The steps counted in the child (``module:attribute``)."""
        return (*COMMON_STEPS, *BACKEND_STEPS.get(self.backend, ()))

    def open(self, root: Path) -> BaseSnapshotter:
        return open_snapshotter(root, self.backend, **self.options)

    def setup_root(self, root: Path) -> dict[str, Any]:
        """base (committed, 3 files) <- leaf (committed); active on base with data."""
        with self.open(root) as sn:
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

    def child_args(self, root: Path) -> list[str]:
        """Arguments the child's operations get as ``argv`` (none here)."""
        return []

    def run_child(self, root: Path, op: str, kill_at: int) -> int | None:
        """Run ``op`` killed at step ``kill_at``; the step count when it finished, else None."""
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), self.op_code[op], str(kill_at),
             self.backend, json.dumps(self.options), json.dumps(self.steps),
             *self.child_args(root)],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        if r.returncode == -signal.SIGKILL:
            return None
        assert r.returncode == 0, r.stderr
        return int(json.loads(r.stdout)["steps"])

    def check_consistent(self, root: Path, digests: dict[str, Any]) -> dict[str, Kind]:
        with self.open(root) as sn:
            sn.cleanup()
            infos = {i.name: i for i in sn.walk()}
            for name, info in infos.items():
                if info.kind is Kind.COMMITTED:
                    with_view = sn.view(f"check-{name}", name)
                    content = tree_digest(Path(with_view[0].source))
                    sn.remove(f"check-{name}")
                else:
                    content = tree_digest(source_of(sn, name))
                if info.kind is Kind.ACTIVE:
                    probe = source_of(sn, name) / ".crash-probe"
                    probe.write_text("an active snapshot takes writes")
                    probe.unlink()
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

    def release(self, root: Path) -> None:
        """After each kill's checks: let go of what the root holds (mounts, devices)."""

    def kill_at_every_step(
        self, op: str, done: Callable[[dict[str, Kind]], bool] | None = None
    ) -> int:
        """Run ``op`` killed before each of its steps in turn; return how many there were.

        ``done`` tells from the kinds left that ``op`` happened (default: OPS).
        """
        done = done or OPS[op]
        kill_at = 1
        finished = None
        while finished is None:
            root = self.base / f"{op}-{kill_at}"
            digests = self.setup_root(root)
            if op == "cleanup":
                # Leftovers of earlier crashes for cleanup to chew on.
                (root / "snapshots" / "new-424242" / "x").mkdir(parents=True)
                (root / "snapshots" / "rm-434343").mkdir()
            finished = self.run_child(root, op, kill_at)
            kinds = self.check_consistent(root, digests)
            if finished is not None:
                assert done(kinds), f"{op} finished but its effect is missing: {kinds}"
            else:
                # Killed: what the operation did not touch is all still there.
                assert kinds.get("base") is Kind.COMMITTED
            self.release(root)
            kill_at += 1
            assert kill_at < 100, "operation never finished"
        steps = kill_at - 2
        print(f"{self.backend} {op}: killed at each of {steps} steps")
        assert steps > 0, f"{op}: no step was interrupted; the test checks nothing"
        return steps
