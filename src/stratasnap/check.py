"""``stratasnap check``: is this root healthy, and what can safely be made right?

:func:`check` reads a root without changing anything (a live server may be
serving it) and returns the findings: the store's own (SQLite's integrity
and foreign keys, parents that exist, no cycles, kinds that make sense)
and the storage's, which the backend's ``_check`` class hook gives (see
:mod:`stratasnap.findings`).

:func:`repair` does only what is safe, holding the root's lock so that no
server starts meanwhile (and refusing while one holds it): unmount mounts
and detach loop devices on storage no snapshot owns, then open the
snapshotter, whose opening puts back interrupted removes, finishes
interrupted commits (erofs) and rebuilds the storage of active and view
snapshots whose creation a power loss took back, and whose cleanup() reclaims orphans and
leftovers, each the backend's own way. It never deletes a snapshot's data:
a missing or corrupt layer may be the parent of others, so that needs a
person. It checks again and reports what was repaired and what remains.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .backends import backend_class, open_snapshotter
from .defaults import LOCK_NAME
from .errors import FailedPrecondition, NotFound
from .findings import Finding, Repair, Row, Survey
from .fs import loop
from .fs.mount import mounts_under, unmount
from .metastore import read_only_survey
from .snapshotter import create_in_progress
from .types import Kind

__all__ = ["Report", "check", "repair", "survey"]


@dataclass(frozen=True)
class Report:
    """What a check found, and after a repair what was repaired and what remains."""

    root: Path
    backend: str
    snapshots: int
    findings: tuple[Finding, ...]
    repaired: tuple[Finding, ...] = ()
    #: Findings still there (after a repair; without one, all of them).
    remaining: tuple[Finding, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.remaining

    def as_dict(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "backend": self.backend,
            "snapshots": self.snapshots,
            "healthy": self.healthy,
            "findings": [f.as_dict() for f in self.findings],
            "repaired": [f.as_dict() for f in self.repaired],
            "remaining": [f.as_dict() for f in self.remaining],
        }


def survey(root: Path, deep: bool = False) -> Survey:
    """Read everything the checks look at, changing nothing (``deep``: see :func:`check`)."""
    root = Path(root).absolute()
    db = root / "metadata.db"
    if not db.is_file():
        raise NotFound(f"no snapshot store at {root} ({db} does not exist)")
    rows, problems = read_only_survey(db)
    snapshots = root / "snapshots"
    try:
        entries = frozenset(os.listdir(snapshots))
    except FileNotFoundError:
        entries = frozenset()
    locked = frozenset(
        n for n in entries if n.startswith("new-") and create_in_progress(snapshots / n)
    )
    real = Path(os.path.realpath(snapshots))
    loops = tuple(
        (dev, Path(backing))
        for dev, backing in loop.backing_files()
        if backing.startswith(f"{real}/")
    )
    return Survey(
        root=root,
        rows=rows,
        entries=entries,
        locked=locked,
        mounts=tuple(mounts_under(snapshots)),
        loops=loops,
        store_problems=problems,
        deep=deep,
    )


def check(root: Path, backend: str = "native", deep: bool = False) -> Report:
    """The findings on ``root`` as ``backend`` lays it out; changes nothing.

    ``deep`` also reads all the data a backend can verify (erofs: hashes every
    layer image against the digest recorded at commit), which costs a read of
    every layer; without it the checks only look at the store and the layout.
    """
    cls = backend_class(backend)
    seen = survey(root, deep)
    findings = (*_store_findings(seen), *cls._check(seen))
    return Report(seen.root, backend, len(seen.rows), findings, remaining=findings)


def repair(
    root: Path,
    backend: str = "native",
    options: Mapping[str, object] | None = None,
    deep: bool = False,
) -> Report:
    """Check, do what is safe, check again; FailedPrecondition while a server holds the root."""
    root = Path(root).absolute()
    if not (root / "metadata.db").is_file():
        check(root, backend, deep)  # NotFound, naming the root, before any lock file is made
    with _root_lock(root):
        before = check(root, backend, deep)
        fixable = [f for f in before.findings if f.repair is not Repair.PERSON]
        # Mounts first (deepest first, as listed), then loop devices: a detach
        # fails while the device is still mounted.
        for finding in fixable:
            if finding.repair is Repair.UNMOUNT:
                with suppress(OSError):
                    unmount(finding.where, lazy=True)
        ours = f"{os.path.realpath(root / 'snapshots')}/"
        for finding in fixable:
            # A device freed meanwhile may already serve another process's image:
            # detach it only while it is still backed by a file under this root.
            backing = dict(loop.backing_files()).get(Path(finding.where), "")
            if finding.repair is Repair.DETACH and backing.startswith(ours):
                with suppress(OSError):
                    loop.detach(finding.where)
        reopen = (Repair.RECLAIM, Repair.RESTORE, Repair.FINISH, Repair.REBUILD)
        if any(f.repair in reopen for f in fixable):
            # Opening recovers interrupted removes, finishes (or undoes) interrupted
            # commits and rebuilds lost active/view storage; cleanup() reclaims the
            # rest, releasing storage the backend's own way.
            with open_snapshotter(root, backend, **dict(options or {})) as sn:
                sn.cleanup()
        after = check(root, backend, deep)
    remaining = set(after.findings)
    repaired = tuple(f for f in before.findings if f not in remaining)
    return Report(root, backend, after.snapshots, before.findings, repaired, after.findings)


# -- the store's own checks --------------------------------------------------------------


def _store_findings(seen: Survey) -> Iterator[Finding]:
    for problem in seen.store_problems:
        yield Finding("store", "metadata.db", f"SQLite reports: {problem}")
    rows = seen.rows
    for row in rows.values():
        if row.kind is None:
            yield Finding(
                "bad-kind",
                _key(row),
                "the store holds a kind that is none of active, view or committed",
            )
        if row.parent_id is None:
            continue
        parent = rows.get(row.parent_id)
        if parent is None:
            yield Finding("missing-parent", _key(row), f"its parent (id {row.parent_id}) is gone")
        elif parent.kind is not Kind.COMMITTED:
            yield Finding(
                "bad-parent",
                _key(row),
                f"its parent {json.dumps(parent.key)} is {parent.kind and parent.kind.value},"
                " not committed",
            )
    yield from _cycles(rows)


def _cycles(rows: Mapping[int, Row]) -> Iterator[Finding]:
    """One finding per parent cycle (a chain that comes back to itself)."""
    done: set[int] = set()
    for start in rows:
        path: list[int] = []
        on_path: set[int] = set()
        sid: int | None = start
        while sid is not None and sid in rows and sid not in done:
            if sid in on_path:
                cycle = path[path.index(sid) :]
                keys = " -> ".join(json.dumps(rows[i].key) for i in cycle)
                yield Finding("parent-cycle", _key(rows[sid]), f"parents form a cycle: {keys}")
                break
            path.append(sid)
            on_path.add(sid)
            sid = rows[sid].parent_id
        done.update(path)


def _key(row: Row) -> str:
    return f"snapshot {json.dumps(row.key)}"


# -- the root's lock ---------------------------------------------------------------------


@contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    """Hold the root's server lock; FailedPrecondition naming the server if it has it."""
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise FailedPrecondition(
                f"a stratasnap server{who} is serving {root}: stop it before --repair"
                " (a check without --repair is safe while it runs)"
            ) from None
        yield
    finally:
        os.close(fd)
