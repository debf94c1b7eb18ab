"""A full disk must not lock the snapshotter out (issue 14).

Each test makes a root on a small ext4 loop filesystem, puts a few snapshots
in it, fills the filesystem to its last block and inode, and then opens the
root again (library, server, CLI): reads, Remove and Cleanup must work and
give space back, and writes must fail with ResourceExhausted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from stratasnap import Kind, ResourceExhausted, open_snapshotter
from stratasnap.server.client import Client
from stratasnap.testing import mounted
from stratasnap.testing.churn import Churn
from stratasnap.testing.diskfill import FreeSpace, fill_filesystem, free_space

MiB = 1 << 20
#: Backend -> options that fit a small filesystem.
BACKENDS: dict[str, dict[str, Any]] = {
    "native": {},
    "overlay": {},
    "blockfile": {"scratch_size": "8M"},
}
VICTIM_BYTES = 4 * MiB
#: How long the server may take to give a removed snapshot's space back.
REAP_WITHIN_S = 10.0


def _write(sn: Any, key: str, size: int, scratch: Path) -> None:
    with mounted(sn.mounts(key), scratch) as target, open(target / "data", "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())


def populate(root: Path, backend: str, scratch: Path) -> None:
    """base (committed), victim (active on base, VICTIM_BYTES of data), look (a view)."""
    with open_snapshotter(root, backend, **BACKENDS[backend]) as sn:
        sn.prepare("base-a")
        _write(sn, "base-a", 64 << 10, scratch)
        sn.commit("base", "base-a")
        sn.prepare("victim", "base", labels={"role": "victim"})
        _write(sn, "victim", VICTIM_BYTES, scratch)
        sn.view("look", "base")


def leftovers(root: Path) -> list[str]:
    """Entries of snapshots/ that are removes or creates in flight (or left behind)."""
    return sorted(n for n in os.listdir(root / "snapshots") if not n.isdigit())


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def full_root(
    loopfs: Callable[..., Path], backend: str, tmp_path: Path
) -> Iterator[tuple[Path, str]]:
    """A populated root whose filesystem (64 MiB ext4, 4096 inodes) is then filled up."""
    fs = loopfs("ext4", size="64M", mkfs_args=("-N", "4096"))
    root = fs / "root"
    populate(root, backend, tmp_path)
    filler = fill_filesystem(fs / "ballast")
    assert free_space(fs) == FreeSpace(bytes=0, inodes=0)
    yield root, backend
    filler.release()


def test_library_opens_reads_removes_and_cleans_on_a_full_disk(
    full_root: tuple[Path, str], tmp_path: Path
) -> None:
    root, backend = full_root
    fs = root.parent
    for _ in range(2):  # and again: closing on a full disk must not spoil the next open
        with open_snapshotter(root, backend, **BACKENDS[backend]) as sn:
            assert {i.name for i in sn.walk()} == {"base", "victim", "look"}
            assert sn.stat("victim").labels == {"role": "victim"}
            assert sn.stat("base").kind is Kind.COMMITTED
            assert sn.usage("victim").size >= VICTIM_BYTES // 2
            assert sn.mounts("look")
            wal = os.stat(f"{root}/metadata.db-wal")
            with pytest.raises(ResourceExhausted):
                sn.prepare("no-room", "base")
            # Refused before anything was written: the WAL's room is for removes.
            assert os.stat(f"{root}/metadata.db-wal").st_mtime_ns == wal.st_mtime_ns
            assert "no-room" not in {i.name for i in sn.walk()}
    before = free_space(fs).bytes
    with open_snapshotter(root, backend, **BACKENDS[backend]) as sn:
        sn.remove("victim")
        # Overlay leaves removed storage to its reaper (here: at close); a create
        # that finds the disk full has it deleted first instead of refusing.
        sn.prepare("right-after", "base")
        sn.remove("right-after")
        sn.remove("look")
    # Gone by the time the snapshotter is closed, without a cleanup() call.
    assert free_space(fs).bytes - before >= VICTIM_BYTES
    assert leftovers(root) == []
    with open_snapshotter(root, backend, **BACKENDS[backend]) as sn:
        sn.cleanup()
        sn.prepare("room-again", "base")
        _write(sn, "room-again", 1 << 10, tmp_path)
        assert {i.name for i in sn.walk()} == {"base", "room-again"}


def server_config(root: Path, backend: str, address: Path) -> Path:
    """A config file serving ``root`` with ``backend`` and its small-filesystem options."""
    options = ", ".join(f'{k} = "{v}"' for k, v in BACKENDS[backend].items())
    path = address.with_suffix(".toml")
    path.write_text(
        f'version = 1\naddress = "{address}"\n'
        f'[snapshotters.stratasnap]\nbackend = "{backend}"\nroot = "{root}"\n'
        f"options = {{{options}}}\n"
    )
    return path


def _serve(root: Path, backend: str, address: Path, log: Path) -> subprocess.Popen[bytes]:
    config = server_config(root, backend, address)
    args = [sys.executable, "-m", "stratasnap", "serve", "--config", str(config)]
    with open(log, "ab") as err:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)


def wait_listening(address: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until the server accepts connections (quicker than gRPC's reconnect backoff)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(address))
                return
            except OSError:
                time.sleep(0.01)
    raise AssertionError(f"server not listening on {address} after {timeout}s")


@contextmanager
def serving(root: Path, backend: str, tmp_path: Path) -> Iterator[tuple[Client, Path]]:
    address, log = tmp_path / "s.sock", tmp_path / "server.log"
    proc = _serve(root, backend, address, log)
    try:
        wait_listening(address, proc)
        with Client(address) as client:
            yield client, log
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()


def wait_for_space(fs: Path, at_least: int, within: float) -> float:
    """Seconds until ``fs`` has ``at_least`` free bytes; fails after ``within``."""
    start = time.monotonic()
    while free_space(fs).bytes < at_least:
        if time.monotonic() - start > within:
            raise AssertionError(f"{free_space(fs)} free after {within}s, wanted {at_least} bytes")
        time.sleep(0.05)
    return time.monotonic() - start


def test_server_starts_and_frees_space_without_cleanup_on_a_full_disk(
    full_root: tuple[Path, str], tmp_path: Path
) -> None:
    root, backend = full_root
    fs = root.parent
    with serving(root, backend, tmp_path) as (client, log):
        assert {i.name for i in client.walk()} == {"base", "victim", "look"}
        assert client.stat("victim").parent == "base"
        assert client.usage("base").inodes > 0
        with pytest.raises(ResourceExhausted):
            client.prepare("no-room", "base")
        client.remove("victim")
        wait_for_space(fs, VICTIM_BYTES, REAP_WITHIN_S)
        assert leftovers(root) == []
        client.cleanup()
        client.prepare("room-again", "base")
    text = log.read_text()
    assert "Traceback" not in text, text
    assert 'level=warning msg="filesystem full' in text, text


def test_server_start_reaps_what_a_killed_process_left(
    loopfs: Callable[..., Path], tmp_path: Path
) -> None:
    """A process killed after Remove left rm-*; the next start deletes it, no call needed."""
    fs = loopfs("ext4", size="64M", mkfs_args=("-N", "4096"))
    root = fs / "root"
    populate(root, "overlay", tmp_path)
    # Remove, then die before the reaper (or close()) deletes anything.
    code = (
        "import os, sys; from stratasnap import open_snapshotter\n"
        "sn = open_snapshotter(sys.argv[1], 'overlay'); sn.remove('victim'); os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)
    assert [n for n in leftovers(root) if n.startswith("rm-")], leftovers(root)
    filler = fill_filesystem(fs / "ballast")
    try:
        with serving(root, "overlay", tmp_path) as (client, _log):
            wait_for_space(fs, VICTIM_BYTES, REAP_WITHIN_S)
            assert leftovers(root) == []
            assert {i.name for i in client.walk()} == {"base", "look"}
    finally:
        filler.release()


def test_open_on_a_full_disk_without_sqlite_files_reaps_first(
    loopfs: Callable[..., Path], tmp_path: Path
) -> None:
    """A store SQLite closed itself (so no -wal/-shm, as older stratasnap left it), on a
    full disk: opening frees what removes left behind, then makes them."""
    import sqlite3

    fs = loopfs("ext4", size="64M", mkfs_args=("-N", "4096"))
    root = fs / "root"
    populate(root, "overlay", tmp_path)
    code = (
        "import sys; from stratasnap import open_snapshotter\n"
        "sn = open_snapshotter(sys.argv[1], 'overlay'); sn.remove('victim')\n"
        "sn.reaper.drain = lambda: None; sn.close()\n"  # ended before deleting
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)
    db = sqlite3.connect(root / "metadata.db")
    db.execute("SELECT 1 FROM sqlite_master").fetchall()
    db.close()  # the last connection: SQLite checkpoints and deletes -wal and -shm
    assert not Path(f"{root}/metadata.db-wal").exists()
    assert [n for n in leftovers(root) if n.startswith("rm-")]
    filler = fill_filesystem(fs / "ballast")
    try:
        with open_snapshotter(root, "overlay") as sn:
            assert {i.name for i in sn.walk()} == {"base", "look"}
            sn.remove("look")
        assert leftovers(root) == []
    finally:
        filler.release()


def test_overlay_leaves_limited_layers_unmounted_on_a_full_disk(
    loopfs: Callable[..., Path], tmp_path: Path
) -> None:
    """After a reboot a size-limited layer's image is mounted at open, unless the disk is
    full: mounting writes into the (sparse) image. Open, list and remove still work."""
    from stratasnap.fs.mount import is_mountpoint, unmount

    fs = loopfs("ext4", size="64M", mkfs_args=("-N", "4096"))
    root = fs / "root"
    with open_snapshotter(root, "overlay") as sn:
        sn.prepare("limited", labels={"containerd.io/snapshot/max-size": str(16 * MiB)})
        _write(sn, "limited", 2 * MiB, tmp_path)
    storage = next(p for p in (root / "snapshots").iterdir() if is_mountpoint(p))
    unmount(storage)  # a reboot took the mount (and its loop device) away
    filler = fill_filesystem(fs / "ballast")
    try:
        with open_snapshotter(root, "overlay") as sn:
            assert not is_mountpoint(storage)
            assert [i.name for i in sn.walk()] == ["limited"]
            sn.remove("limited")
        assert leftovers(root) == [] and not storage.exists()
    finally:
        filler.release()


def _cli(root: Path, backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    opts = [a for k, v in BACKENDS[backend].items() for a in ("--option", f"{k}={v}")]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "stratasnap",
            "--root",
            str(root),
            "--backend",
            backend,
            *opts,
            *list(args),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_works_on_a_full_disk_and_rm_frees_before_exit(full_root: tuple[Path, str]) -> None:
    root, backend = full_root
    fs = root.parent
    ls = _cli(root, backend, "ls")
    assert ls.returncode == 0, ls.stderr
    assert "victim" in ls.stdout and "base" in ls.stdout
    full = _cli(root, backend, "prepare", "no-room", "base")
    assert full.returncode == 6, full.stderr  # ResourceExhausted's exit code
    assert "resource exhausted" in full.stderr
    before = free_space(fs).bytes
    rm = _cli(root, backend, "rm", "victim")
    assert rm.returncode == 0, rm.stderr
    assert free_space(fs).bytes - before >= VICTIM_BYTES  # at exit, no cleanup run
    assert leftovers(root) == []
    clean = _cli(root, backend, "cleanup")
    assert clean.returncode == 0, clean.stderr


# -- the kill loop ---------------------------------------------------------------------

KILLS = 200
#: Bytes each layer of the kill loop writes, and how many committed layers it keeps.
LAYER_BYTES = 1 * MiB
KEEP = 6

# Forks servers from one process that has imported everything already: a
# restart then costs milliseconds instead of an interpreter start (0.5-2 s
# on a loaded 2-CPU machine), so 200 kills take about a minute. The child
# runs the very serve() of `stratasnap serve`. A fork is safe here because
# the zygote is single-threaded and has never started gRPC (grpc is
# imported, nothing of it runs; its fork support is off): it checks both
# before every fork instead of trusting it.
#
# The zygote reaps a child only when the test asks ("wait <pid>") and answers
# with its wait status: until then a dead server stays a zombie, so its pid
# cannot be reused by another process while the test still signals or
# watches it, and a server that dies before listening fails the test naming
# the signal or exit status it died of. (An earlier version ignored SIGCHLD:
# children were reaped at once, statuses were lost, and deaths before
# listening could only be guessed at.)
ZYGOTE = """
import os, sys, threading
import grpc
import stratasnap.backends.overlay  # noqa: F401 (imported once, before the forks)
from stratasnap.server.config import load_config
from stratasnap.server.daemon import serve

root, address, log = sys.argv[1:4]
for line in sys.stdin:
    command, _, arg = line.partition(" ")
    if command == "wait":
        print(os.waitpid(int(arg), 0)[1], flush=True)
        continue
    threads = len(os.listdir("/proc/self/task"))
    assert threads == 1 == threading.active_count(), f"zygote has {threads} threads"
    assert not grpc._cython.cygrpc.is_fork_support_enabled()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), 2)
        code = 0
        try:
            serve(load_config(root=root, address=address, backend="overlay"))
        except BaseException as exc:
            print(f"serve failed: {exc!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    print(pid, flush=True)
"""


class Zygote:
    """The forking process: spawn() a server, reap() it once it is dead."""

    def __init__(self, root: Path, address: Path, log: Path) -> None:
        self.address, self.log = address, log
        self.children: set[int] = set()  # spawned and not reaped: safe to signal
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(root), str(address), str(log)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, request: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the zygote died (status {self.proc.wait(30)})"
        return int(answer)

    def spawn(self) -> int:
        pid = self._ask("spawn")
        self.children.add(pid)
        return pid

    def reap(self, pid: int, timeout: float = 30.0) -> str:
        """Wait until server ``pid`` is dead, reap it, and say how it ended."""
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"server {pid} still alive after {timeout}s")
            time.sleep(0.002)
        status = self._ask(f"wait {pid}")
        self.children.discard(pid)
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exited with status {os.WEXITSTATUS(status)}"

    def kill(self, pid: int) -> str:
        os.kill(pid, signal.SIGKILL)  # a zombie until reaped: never another process
        return self.reap(pid)

    def wait_listening(self, pid: int, timeout: float = 60.0) -> None:
        """Until server ``pid`` accepts connections; fails, saying how, if it died first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                raise AssertionError(
                    f"server {pid} died while starting ({self.reap(pid)});"
                    f" server log: {self.log.read_text()[-2000:]}"
                )
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.address))
                    return
                except OSError:
                    time.sleep(0.005)
        raise AssertionError(f"server {pid} not listening after {timeout}s")

    def close(self) -> None:
        """Kill the servers still there (a failed test must not leave one on its root)."""
        for pid in list(self.children):
            self.kill(pid)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def _alive(pid: int) -> bool:
    """Whether child ``pid`` still runs (not a zombie waiting to be reaped)."""
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def test_kill_loop_on_a_small_filesystem_keeps_restarting_and_leaks_nothing(
    loopfs: Callable[..., Path], tmp_path: Path
) -> None:
    """200 SIGKILLs of the server amid prepares, commits and removes, never a Cleanup.

    The filesystem is nearly full from the start (a few layers' room), so
    writes keep failing with ResourceExhausted and only removes, reaped in
    the background and at each start, give the room back. Every start must
    succeed; at the end nothing may be left: no rm-*/new-* once the last
    server reaped, and after its Cleanup only owned storage.
    """
    import random
    import threading

    from stratasnap.errors import SnapshotError

    fs = loopfs("ext4", size="48M", mkfs_args=("-N", "2048"))
    root, address, log = fs / "root", tmp_path / "s.sock", tmp_path / "server.log"
    open_snapshotter(root, "overlay").close()  # the root exists before the disk fills
    filler = fill_filesystem(fs / "ballast", leave=(KEEP - 1) * LAYER_BYTES, inodes=False)
    zygote = Zygote(root, address, log)
    rng = random.Random(14)
    work = Churn(layer_bytes=LAYER_BYTES, keep=KEEP)
    kills = 0
    try:
        while kills < KILLS:
            pid = zygote.spawn()
            if kills % 4 == 3:  # now and then during start-up (opening, reaping)
                time.sleep(rng.uniform(0.0, 0.03))
            else:
                # Every start must succeed: a server that dies first fails the test.
                zygote.wait_listening(pid)
                timer = threading.Timer(rng.uniform(0.02, 0.25), os.kill, (pid, 9))
                timer.start()
                with Client(address, timeout=10) as client, suppress(SnapshotError):
                    work.resync(client)
                    work.run(client)
                timer.join()
            zygote.kill(pid)
            kills += 1
        # The last start: it must come up, reap, and account for everything.
        pid = zygote.spawn()
        zygote.wait_listening(pid)
        # The audit reads each layer through a view, and a view needs a block of
        # its own: the last kill may have left the disk full to the last block
        # (then a view is rightly ResourceExhausted). The full-disk promises were
        # tested by the starts above; what is checked now is the data.
        filler.release()
        with Client(address, timeout=30) as client:
            audit = work.audit(client)
            assert audit.bad == (), f"committed layers with wrong content: {audit.bad}"
            # The kills leave a backlog (each run reaps while removing more).
            deadline = time.monotonic() + 3 * REAP_WITHIN_S
            while leftovers(root) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert leftovers(root) == [], (
                f"removed storage not reaped without Cleanup; server log: {log.read_text()[-3000:]}"
            )
            client.cleanup()
        assert set(os.listdir(root / "snapshots")) == audit.storage, "orphans after Cleanup"
        os.kill(pid, signal.SIGTERM)
        assert zygote.reap(pid) == "exited with status 0", log.read_text()[-2000:]
        print(f"kill loop: {kills} kills, {work.n} steps, disk full {work.full} times")
        assert work.full > 0, "the filesystem never filled: the loop tested too little"
        assert "serve failed" not in log.read_text(), log.read_text()[-2000:]
    finally:
        zygote.close()
        filler.release()
