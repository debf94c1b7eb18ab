"""The server process: socket, lock, concurrency, shutdown, signals, metrics, logs."""

from __future__ import annotations

import grp
import io
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from stratasnap.errors import NotFound, Unavailable
from stratasnap.server.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from stratasnap.server.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from stratasnap.server.client import Client
from stratasnap.server.config import Config, SnapshotterConfig, load_config
from stratasnap.server.daemon import (
    LOCK_NAME,
    DaemonError,
    LogfmtFormatter,
    Server,
    configure_logging,
    open_store,
)
from stratasnap.snapshotter import BaseSnapshotter, Snapshotter
from stratasnap.types import Info

SRC = Path(__file__).resolve().parents[2] / "src"


def config_in(scratch: Path, **kw: Any) -> Config:
    return load_config(root=scratch / "root", address=scratch / "s.sock", **kw)


@pytest.fixture
def server(scratch: Path) -> Iterator[Server]:
    with Server(config_in(scratch)) as s:
        yield s


# -- the socket ---------------------------------------------------------------------------


def test_socket_is_owner_only(server: Server) -> None:
    st = os.stat(server.address)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


def test_start_leaves_the_process_umask_alone(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A library user's threads share the umask: setting it around bind() would race.
    def refuse(mask: int) -> int:
        raise AssertionError(f"os.umask({mask:#o}) called while starting")

    monkeypatch.setattr(os, "umask", refuse)
    with Server(config_in(scratch)) as s:
        assert stat.S_IMODE(os.stat(s.address).st_mode) == 0o600
        assert sorted(os.listdir(s.address.parent)) == ["root", "s.sock"]  # no bind dir left


def test_a_socket_path_of_the_longest_length_serves(scratch: Path) -> None:
    # The bind happens in a directory beside the address, whose path is longer:
    # an address the kernel takes must still work.
    stem = str(scratch) + "/"
    run = Path(stem + "x" * (107 - len(stem) - len("/s.sock")))
    address = run / "s.sock"
    assert len(str(address)) == 107
    config = load_config(root=scratch / "root", address=address)
    with Server(config) as s, Client(s.address) as client:
        client.prepare("k")
        assert client.stat("k").name == "k"
        assert stat.S_IMODE(os.stat(address).st_mode) == 0o600
    assert os.listdir(run) == []  # socket and bind directory gone


def test_socket_group(scratch: Path) -> None:
    gid = os.getegid()
    group = grp.getgrgid(gid).gr_name
    for value in (group, str(gid)):
        with Server(config_in(scratch, socket_group=value)) as s:
            st = os.stat(s.address)
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert st.st_gid == gid
    with pytest.raises(DaemonError, match="no such group"):
        Server(config_in(scratch, socket_group="no-such-group-xyz")).start()


def test_socket_removed_on_stop_and_parent_created(scratch: Path) -> None:
    config = load_config(root=scratch / "root", address=scratch / "run" / "deep" / "s.sock")
    with Server(config) as s:
        assert s.address.exists()
        assert stat.S_IMODE(os.stat(s.address.parent).st_mode) == 0o711
    assert not config.address.exists()


def test_stale_socket_is_replaced(scratch: Path) -> None:
    path = scratch / "s.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # bound, never listening, then closed: what a crash leaves
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with Server(config_in(scratch)) as s, Client(s.address) as c:
        c.prepare("works")
        assert c.stat("works").name == "works"


def test_live_socket_is_not_stolen(scratch: Path) -> None:
    path = scratch / "s.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(DaemonError, match="already listening on"):
            Server(config_in(scratch)).start()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # still there, still theirs
        # ... and the failed start gave the root back.
        assert _lock_is_free(scratch / "root")
    finally:
        live.close()


def test_non_socket_at_address_is_refused(scratch: Path) -> None:
    (scratch / "s.sock").write_text("important")
    with pytest.raises(DaemonError, match="not a socket"):
        Server(config_in(scratch)).start()
    assert (scratch / "s.sock").read_text() == "important"


def _lock_is_free(root: Path) -> bool:
    import fcntl

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_second_server_on_the_same_root_is_refused(server: Server, scratch: Path) -> None:
    other = load_config(root=scratch / "root", address=scratch / "other.sock")
    with pytest.raises(DaemonError) as e:
        Server(other).start()
    message = str(e.value)
    assert f"pid {os.getpid()}" in message
    assert str(scratch / "root" / LOCK_NAME) in message
    assert "already serving root" in message
    assert not (scratch / "other.sock").exists()
    with Client(server.address) as c:  # the first one is unharmed
        c.prepare("still-fine")
    # Refused as a process too, with the message and a non-zero exit.
    proc = _run_module("serve", "--root", str(scratch / "root"), "--address", str(scratch / "x"))
    assert proc.returncode == 1
    assert "already serving root" in proc.stderr


def test_failed_open_undoes_the_start(scratch: Path) -> None:
    def broken(sc: SnapshotterConfig) -> Snapshotter:
        raise OSError(28, "No space left on device")

    with pytest.raises(DaemonError, match=r"cannot open backend 'native'.*No space left"):
        Server(config_in(scratch), opener=broken).start()
    assert not (scratch / "s.sock").exists()
    assert _lock_is_free(scratch / "root")
    with pytest.raises(DaemonError, match="unknown backend"):
        Server(config_in(scratch, backend="nope")).start()
    with Server(config_in(scratch)):  # and a good start works afterwards
        pass


# -- concurrency ----------------------------------------------------------------------------


def test_32_concurrent_clients(server: Server) -> None:
    store = server.snapshotters["stratasnap"]
    store.prepare("base-a")
    store.commit("base", "base-a")

    def worker(n: int) -> int:
        done = 0
        with Client(server.address, namespace=f"ns{n}", timeout=60) as c:
            for i in range(10):
                key = f"ns{n}/{i}/layer"
                c.prepare(key, "base", labels={"worker": str(n)})
                c.commit(f"ns{n}/{i}/committed", key, labels={"worker": str(n)})
                assert c.stat(f"ns{n}/{i}/committed").parent == "base"
                c.prepare(f"ns{n}/{i}/ctr", f"ns{n}/{i}/committed")
                c.usage(f"ns{n}/{i}/ctr")
                c.remove(f"ns{n}/{i}/ctr")
                if i % 2:
                    c.remove(f"ns{n}/{i}/committed")
                done += 1
            assert len(list(c.walk(f"labels.worker=={n}"))) == 5
        return done

    with ThreadPoolExecutor(32) as pool:
        assert sum(pool.map(worker, range(32))) == 320
    assert len(list(store.walk())) == 1 + 32 * 5


def test_stat_and_writes_during_a_paused_list(server: Server) -> None:
    store = server.snapshotters["stratasnap"]
    for i in range(1000):
        store.prepare(f"s{i}")
    with Client(server.address, timeout=10) as lister, Client(server.address, timeout=10) as c:
        stream = lister.list_batches()
        first = next(stream)  # the List is running, and its client is not reading
        assert len(first) == 100
        # Reads and writes go through meanwhile (no lock held by the paused List).
        assert c.stat("s5").name == "s5"
        c.prepare("during-list")
        c.remove("s999")
        c.update(Info("s1", store.stat("s1").kind, labels={"x": "1"}))
        rest = [i for batch in stream for i in batch]
        assert len(first) + len(rest) == 1000  # what existed when the List read the store


def test_cancelled_list_frees_its_worker(server: Server) -> None:
    store = server.snapshotters["stratasnap"]
    for i in range(500):
        store.prepare(f"s{i}")
    with grpc.insecure_channel(f"unix:{server.address}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        calls = [stub.List(pb.ListSnapshotsRequest()) for _ in range(20)]
        for call in calls:
            next(call)
            call.cancel()
    with Client(server.address, timeout=10) as c:
        assert c.stat("s1").name == "s1"
    deadline = time.monotonic() + 5
    while server.service.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.service.running == 0


# -- shutdown -------------------------------------------------------------------------------


class Gate:
    """Wraps a store so that ``stat`` blocks until released (an in-flight call)."""

    def __init__(self, inner: Snapshotter) -> None:
        self.inner = inner
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.closed_while_running = False
        self._running = 0
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stat(self, key: str) -> Info:
        self._running += 1
        self.entered.release()
        try:
            self.release.wait(30)
            if self.closed:
                self.closed_while_running = True
            return self.inner.stat(key)
        finally:
            self._running -= 1

    def close(self) -> None:
        self.closed = True
        self.inner.close()


def _gated_server(scratch: Path, **kw: Any) -> tuple[Server, list[Gate]]:
    gates: list[Gate] = []

    def opener(sc: SnapshotterConfig) -> Snapshotter:
        gate = Gate(open_store(sc))
        gates.append(gate)
        return cast(Snapshotter, gate)

    return Server(config_in(scratch, **kw), opener=opener), gates


def test_shutdown_finishes_in_flight_calls(scratch: Path) -> None:
    server, gates = _gated_server(scratch)
    server.start()
    gate = gates[0]
    gate.inner.prepare("k")
    results: list[object] = []

    def call() -> None:
        with Client(server.address, timeout=30) as c:
            try:
                results.append(c.stat("k").name)
            except Exception as e:
                results.append(e)

    callers = [threading.Thread(target=call) for _ in range(4)]
    for t in callers:
        t.start()
    for _ in callers:
        assert gate.entered.acquire(timeout=10)  # all 4 are inside the store
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 20})
    stopper.start()
    time.sleep(0.3)
    # Stopping: the socket no longer takes new calls...
    with Client(server.address, timeout=2) as late, pytest.raises(Unavailable):
        late.stat("k")
    assert stopper.is_alive()  # ... but waits for the running ones
    gate.release.set()
    stopper.join(20)
    for t in callers:
        t.join(10)
    assert results == ["k"] * 4
    assert gate.closed and not gate.closed_while_running
    assert not server.address.exists()
    assert _lock_is_free(scratch / "root")


def test_shutdown_grace_runs_out(scratch: Path) -> None:
    server, gates = _gated_server(scratch)
    server.start()
    gate = gates[0]
    gate.inner.prepare("k")
    errors: list[BaseException] = []

    def call() -> None:
        with Client(server.address, timeout=30) as c:
            try:
                c.stat("k")
            except Exception as e:
                errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    assert gate.entered.acquire(timeout=10)
    started = time.monotonic()
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 0.5})
    stopper.start()
    t.join(10)
    assert errors and not t.is_alive()  # cancelled once the grace ran out
    assert stopper.is_alive()  # the handler is still inside the store: not closed yet
    assert not gate.closed
    gate.release.set()
    stopper.join(10)
    assert gate.closed and not gate.closed_while_running
    assert time.monotonic() - started < 10


def test_stop_is_idempotent(scratch: Path) -> None:
    server = Server(config_in(scratch))
    server.stop()  # never started: nothing to do
    server = Server(config_in(scratch))
    server.start()
    threads = [threading.Thread(target=server.stop) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    server.stop()
    assert server.wait(0)
    with pytest.raises(RuntimeError):
        server.start()


def _run_module(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stratasnap.server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


def _start_process(scratch: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stratasnap.server",
            "serve",
            "--root",
            str(scratch / "root"),
            "--address",
            str(scratch / "s.sock"),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_process_stops_cleanly_on_signal(scratch: Path, signum: signal.Signals) -> None:
    proc = _start_process(scratch, "--log-level", "debug")
    try:
        with Client(scratch / "s.sock", namespace="k8s.io", timeout=10) as c:
            c.wait_ready(15)
            c.prepare("k8s.io/1/key with spaces")
            c.commit("k8s.io/2/sha256:abc", "k8s.io/1/key with spaces")
            with pytest.raises(NotFound):
                c.stat("missing")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert not (scratch / "s.sock").exists()
    lines = err.splitlines()
    assert any("msg=serving" in line for line in lines)
    assert any(f"signal={signum.name}" in line for line in lines)
    assert lines[-1].endswith("msg=stopped")
    prepare = next(line for line in lines if "method=Prepare" in line)
    assert "namespace=k8s.io" in prepare and 'key="k8s.io/1/key with spaces"' in prepare
    assert any("method=Stat" in line and "code=NOT_FOUND" in line for line in lines)
    # The data outlives the process.
    with Server(config_in(scratch)) as again:
        assert again.snapshotters["stratasnap"].stat("k8s.io/2/sha256:abc").kind == "committed"


def test_process_reports_config_errors(scratch: Path) -> None:
    bad = scratch / "bad.toml"
    bad.write_text('log_level = "loud"\n')
    proc = _run_module("serve", "--config", str(bad))
    assert proc.returncode == 2
    assert f"config {bad}: log_level: 'loud' is not one of" in proc.stderr


# -- metrics and logs -----------------------------------------------------------------------


def test_metrics_endpoint(scratch: Path) -> None:
    config = config_in(scratch, metrics_address="127.0.0.1:0")
    with Server(config) as server, Client(server.address) as c:
        port = server.metrics_port
        assert port
        c.prepare("a")
        c.commit("b", "a")
        c.prepare("c", "b")
        c.view("v", "b")
        c.stat("b")
        with pytest.raises(NotFound):
            c.stat("missing")
        list(c.walk())
        leftover = scratch / "root" / "snapshots" / "new-77"
        leftover.mkdir()
        (leftover / "f").write_bytes(b"z" * 5000)
        c.cleanup()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['stratasnap_rpc_requests_total{method="Stat"}'] == 2
    assert samples['stratasnap_rpc_requests_total{method="Prepare"}'] == 2
    assert samples['stratasnap_rpc_requests_total{method="Mounts"}'] == 0
    assert samples['stratasnap_rpc_errors_total{code="NOT_FOUND",method="Stat"}'] == 1
    assert samples['stratasnap_rpc_duration_seconds_count{method="Commit"}'] == 1
    assert samples['stratasnap_rpc_duration_seconds_bucket{le="+Inf",method="List"}'] == 1
    assert samples['stratasnap_snapshots{kind="committed",snapshotter="stratasnap"}'] == 1
    assert samples['stratasnap_snapshots{kind="active",snapshotter="stratasnap"}'] == 1
    assert samples['stratasnap_snapshots{kind="view",snapshotter="stratasnap"}'] == 1
    assert samples['stratasnap_cleanup_reclaimed_bytes_total{snapshotter="stratasnap"}'] >= 5000
    assert "# TYPE stratasnap_rpc_duration_seconds histogram" in text
    # Alone, each write call had a commit of its own.
    batches = samples['stratasnap_commit_batch_size_count{snapshotter="stratasnap"}']
    assert batches >= 4  # prepare, commit, prepare, view (and id reservations, cleanup)
    assert samples['stratasnap_commit_batch_size_bucket{le="1.0",snapshotter="stratasnap"}'] == (
        batches
    )
    assert samples['stratasnap_commit_batch_size_sum{snapshotter="stratasnap"}'] == batches
    assert not any(k.startswith("python_gc") for k in samples)  # our own registry only


def test_metrics_port_in_use_is_a_clear_error(scratch: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(DaemonError, match=f"metrics_address 127.0.0.1:{port}"):
            Server(config_in(scratch, metrics_address=f"127.0.0.1:{port}")).start()
        assert not (scratch / "s.sock").exists()
    finally:
        taken.close()


def test_logfmt_lines() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("debug", stream)
    try:
        log = logging.getLogger("stratasnap.server")
        log.info("serving", extra={"address": "/run/x.sock", "note": 'has "quotes" and space'})
        log.debug("rpc", extra={"method": "Stat", "empty": ""})
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("rpc crashed", extra={"method": "Prepare"})
        logging.getLogger("grpc._server").info("hidden: others log at warning")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("stratasnap").setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("time=") and lines[0].split()[0].endswith("Z")
    assert " level=info msg=serving address=/run/x.sock " in lines[0]
    assert lines[0].endswith('note="has \\"quotes\\" and space"')
    assert lines[1].endswith('level=debug msg=rpc method=Stat empty=""')
    assert 'level=error msg="rpc crashed" method=Prepare' in lines[2]
    assert lines[3] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad"
    assert "hidden" not in stream.getvalue()
    assert LogfmtFormatter().format(logging.makeLogRecord({"msg": "x"})).endswith("msg=x")


def test_systemd_notify(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(scratch / "notify"))
    notify.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(scratch / "notify"))
    try:
        with Server(config_in(scratch)):
            assert notify.recv(100) == b"READY=1"
        assert notify.recv(100) == b"STOPPING=1"
    finally:
        notify.close()


@pytest.mark.parametrize(
    ("table", "largest"),
    [("", 6), ("enabled = false", 1), ("max_batch = 2", 2), ("enabled = false\nmax_batch = 9", 1)],
)
def test_group_commit_setting_bounds_the_batches(scratch: Path, table: str, largest: int) -> None:
    # One write holds the writer's turn while five prepares queue behind it:
    # they share its commit up to the configured bound, and none when disabled.
    f = scratch / "c.toml"
    f.write_text(f"[group_commit]\n{table}\n")
    with Server(load_config(f, root=scratch / "root", address=scratch / "s.sock")) as server:
        sn = server.snapshotters["stratasnap"]
        assert isinstance(sn, BaseSnapshotter)
        store = sn._store
        while len(store._ids) < 5:  # ids at hand: no reservation write joins the batches
            store.reserve_id()
        before = dict(sn.commit_batch_sizes())
        holding, go = threading.Event(), threading.Event()

        def hold() -> None:
            with store.write():
                holding.set()
                go.wait(20)

        first = threading.Thread(target=hold)
        first.start()
        assert holding.wait(20)
        with ThreadPoolExecutor(5) as pool:
            calls = [pool.submit(sn.prepare, f"p{i}") for i in range(5)]
            deadline = time.monotonic() + 20
            while store._group.queued < 5 and time.monotonic() < deadline:
                time.sleep(0.002)
            go.set()
            for call in calls:
                call.result(30)
        first.join(30)
        after = sn.commit_batch_sizes()
        grown = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        assert sum(size * n for size, n in grown.items()) == 6  # every write committed
        assert max(grown) == largest, grown
