"""The stratasnap server process: stores, socket, gRPC, signals, logs.

:func:`serve` is ``stratasnap serve``: it runs a :class:`Server` until SIGTERM
or SIGINT. :class:`Server` is usable on its own (tests, embedding)::

    with Server(load_config(root=..., address=...)) as server:
        ...  # clients talk to server.address

Start-up order: lock every snapshotter root (``flock`` on the root directory
itself, so that a full filesystem does not stop it; a second server on the
same root is refused and told the first one's pid, kept in
``<root>/.stratasnap.lock`` when there is room), open the stores, start
their reapers (removed snapshots' storage is deleted in the background
right after Remove, and earlier processes' leftovers at once), claim the
socket (a leftover socket is replaced only when nothing answers on it), bind
it owner-only (0600, or 0660 with ``socket_group``), start gRPC, then the
metrics endpoint, then tell systemd (``READY=1`` when ``NOTIFY_SOCKET`` is set).

Shutdown (:meth:`Server.stop`): stop accepting, let in-flight calls finish
for ``shutdown_timeout`` seconds (then cancel them), wait for the handlers to
leave the stores, close the stores, remove the socket, release the locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import grpc

from ..defaults import LOCK_NAME
from ..images.unpack import layer_converter, remove_abandoned
from ..snapshotter import BaseSnapshotter, Snapshotter
from .config import Config, SnapshotterConfig
from .fastpath import FastPath
from .metrics import Metrics, MetricsServer
from .service import SEND_TIMEOUT, SnapshotsService, Snapshotters

__all__ = [
    "LOCK_NAME",
    "MAX_CALLS",
    "MAX_MESSAGE_SIZE",
    "WORKERS",
    "DaemonError",
    "LogfmtFormatter",
    "Server",
    "configure_logging",
    "open_store",
    "serve",
]

log = logging.getLogger("stratasnap.server")

#: containerd's proxy client sends and receives up to 16 MiB.
MAX_MESSAGE_SIZE = 16 << 20
#: gRPC worker threads. Threads that wait (a slow disk, a stream whose client
#: reads slowly) cost only memory, so there are many more than CPUs: the 4-8
#: that measure fastest would all be taken by eight stalled clients. Threads are
#: started as calls need them.
WORKERS = 64
#: Calls in progress at once (running or queued for a thread); beyond, a call is
#: RESOURCE_EXHAUSTED at once instead of queueing without bound.
MAX_CALLS = 1024


class DaemonError(Exception):
    """The server cannot start (or run): the message says why, for the operator."""


# -- logging -----------------------------------------------------------------------------

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    """``time=… level=info msg="serving" address=/run/…`` lines (logfmt, like containerd's).

    Fields passed with ``extra={…}`` become ``key=value`` pairs; a traceback
    follows its line.
    """

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds")
        parts = [
            f"time={when.replace('+00:00', 'Z')}",
            f"level={record.levelname.lower()}",
            f"msg={_logfmt_value(record.getMessage())}",
        ]
        if record.name and not record.name.startswith("stratasnap"):
            parts.append(f"logger={_logfmt_value(record.name)}")
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                parts.append(f"{key}={_logfmt_value(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    """Structured logs on ``stream`` (stderr): stratasnap at ``level``, others at warning."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("stratasnap").setLevel(level.upper())


# -- pieces ------------------------------------------------------------------------------


def open_store(config: SnapshotterConfig) -> Snapshotter:
    """Open the snapshotter ``config`` describes (the default opener of :class:`Server`)."""
    from ..backends import open_snapshotter

    return open_snapshotter(config.root, config.backend, **config.options)


class _RootLock:
    """An exclusive ``flock`` on the root directory; the owner's pid in ``<root>/.stratasnap.lock``.

    The lock is on the directory, which exists, so that taking it needs no
    inode on a full filesystem. The pid file is only for the refusal
    message: written when there is room, blanked (in place, keeping its
    block for the next server) on release.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / LOCK_NAME
        self._fd = -1
        self._pid_len = 0

    def acquire(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_pid(self.path)
            who = f" (pid {holder})" if holder else ""
            raise DaemonError(
                f"another stratasnap server{who} is already serving root {self.root} "
                f"(it holds the lock on it, pid in {self.path}); stop it first or use another root"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._pid_len = _write_pid(self.path, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            if self._pid_len:
                _write_pid(self.path, b" " * self._pid_len)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def _read_pid(path: Path) -> str:
    try:
        text = path.read_bytes()[:64].decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _write_pid(path: Path, data: bytes) -> int:
    """Overwrite ``path`` with ``data`` (padded with blanks); the bytes written, 0 if none.

    Overwrites in place rather than truncating, so that the file keeps its
    block: on a full filesystem the pid still fits. No room: logged, no pid.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            os.pwrite(fd, data.ljust(size), 0)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("cannot record the pid", extra={"path": str(path), "error": e.strerror or e})
        return 0
    return len(data)


def _listen_privately(
    server: grpc.Server, address: Path, gid: int | None
) -> tuple[os.stat_result, int]:
    """Have ``server`` listen on ``address``, a socket no one else could reach even briefly.

    bind() creates the socket with the process umask, and changing the umask
    would race with every other thread of the process (a library user's, our
    own layer appliers'). So the socket is bound in a fresh owner-only
    directory beside ``address``, given its group and mode there, then renamed
    into place: it appears at ``address`` with its final permissions.

    grpc is given the directory as ``/proc/self/fd/N/s``: a socket path holds
    at most 107 bytes, and the directory's own path is longer than
    ``address``. Returns the socket's stat and N, an O_PATH descriptor of the
    (by then deleted) directory, to be closed only after the server stopped:
    grpc looks the bound path up again at shutdown, and while N stays open
    that lookup finds nothing rather than another directory given the number.
    """
    private = Path(tempfile.mkdtemp(prefix=".ss-", dir=address.parent))  # mode 0700
    try:
        held = os.open(private, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                server.add_insecure_port(f"unix:/proc/self/fd/{held}/s")
            except RuntimeError as e:
                raise OSError(errno.EADDRNOTAVAIL, f"cannot listen: {e}") from None
            bound = private / "s"
            if gid is not None:
                os.chown(bound, -1, gid)
            os.chmod(bound, 0o660 if gid is not None else 0o600)
            os.rename(bound, address)
            return os.stat(address), held
        except BaseException:
            os.close(held)
            raise
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _claim_socket(path: Path) -> None:
    """Make ``path`` free for a new socket: remove a stale one, refuse a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("removed stale socket", extra={"address": str(path)})
        return
    except OSError as e:
        raise DaemonError(f"cannot tell whether {path} is in use: {e.strerror or e}") from None
    finally:
        probe.close()
    raise DaemonError(
        f"something is already listening on {path} (another stratasnap?); "
        "stop it or choose another address"
    )


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise DaemonError(f"socket_group {group!r}: no such group") from None


def _warn_if_full(root: Path) -> None:
    """Tell the operator at start that the root's filesystem has no room left."""
    try:
        st = os.statvfs(root)
    except OSError:
        return
    if st.f_bfree == 0 or (st.f_files > 0 and st.f_ffree == 0):
        log.warning(
            "filesystem full: serving reads, Remove and Cleanup; writes fail until space is freed",
            extra={"root": str(root), "free_blocks": st.f_bfree, "free_inodes": st.f_ffree},
        )


def _notify_systemd(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd", extra={"error": e})


# -- the server --------------------------------------------------------------------------


class Server:
    """One running stratasnap server (see the module doc for what start and stop do)."""

    def __init__(
        self,
        config: Config,
        *,
        opener: Callable[[SnapshotterConfig], Snapshotter] = open_store,
        workers: int = WORKERS,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.config = config
        self.address = config.address
        self.metrics = Metrics()
        self._opener = opener
        self._workers = workers
        self._send_timeout = send_timeout
        self._locks: list[_RootLock] = []
        self._stores: dict[str, Snapshotter] = {}
        self._service: SnapshotsService | None = None
        self._fastpath: FastPath | None = None
        self._grpc: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._metrics_server: MetricsServer | None = None
        self._socket_id: tuple[int, int] | None = None
        #: The deleted directory the socket was bound in (see _listen_privately).
        self._bind_dir: int | None = None
        self._state = threading.Lock()
        self._started = False
        self._stopping = False
        self._stopped = threading.Event()

    # -- properties --------------------------------------------------------------------

    @property
    def snapshotters(self) -> dict[str, Snapshotter]:
        """The open stores, by name."""
        return dict(self._stores)

    @property
    def service(self) -> SnapshotsService:
        if self._service is None:
            raise RuntimeError("server not started")
        return self._service

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server is not None else None

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bring the server up, or raise :class:`DaemonError` having undone what it did."""
        with self._state:
            if self._started or self._stopping:
                raise RuntimeError("a Server starts once")
            self._started = True
        try:
            self._start()
        except BaseException:
            with self._state:
                self._stopping = True
            self._teardown()
            self._stopped.set()
            raise

    def _start(self) -> None:
        config = self.config
        gid = _group_id(config.socket_group) if config.socket_group else None
        for sc in config.snapshotters:
            try:
                sc.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise DaemonError(f"cannot create root {sc.root}: {e.strerror or e}") from None
            lock = _RootLock(sc.root)
            lock.acquire()
            self._locks.append(lock)
        for sc in config.snapshotters:
            try:
                self._stores[sc.name] = self._opener(sc)
            except Exception as e:
                raise DaemonError(
                    f"snapshotter {sc.name!r}: cannot open backend {sc.backend!r} on {sc.root}: {e}"
                ) from e

        for sc in config.snapshotters:
            _warn_if_full(sc.root)
        for store in self._stores.values():
            if isinstance(store, BaseSnapshotter):
                store.set_max_batch(config.group_commit.batch_limit)
                store.start_reaper()

        self._fastpath = self._start_fastpath()
        service = SnapshotsService(
            Snapshotters(self._stores),
            self.metrics,
            max_streams=max(1, self._workers // 2),
            send_timeout=self._send_timeout,
            fastpath=self._fastpath,
        )
        self.metrics.watch(self._stores)
        self._service = service

        address = config.address
        try:
            address.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        except OSError as e:
            raise DaemonError(f"cannot create {address.parent}: {e.strerror or e}") from None
        _claim_socket(address)

        self._executor = ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="stratasnap-rpc"
        )
        server = grpc.server(
            self._executor,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
            ],
            maximum_concurrent_rpcs=MAX_CALLS,
        )
        service.register(server)
        self._grpc = server
        try:
            st, self._bind_dir = _listen_privately(server, address, gid)
        except OSError as e:
            raise DaemonError(f"cannot set up socket {address}: {e.strerror or e}") from None
        server.start()
        self._socket_id = (st.st_dev, st.st_ino)

        if config.metrics_address:
            try:
                self._metrics_server = self.metrics.serve(config.metrics_address)
            except OSError as e:
                raise DaemonError(
                    f"metrics_address {config.metrics_address}: {e.strerror or e}"
                ) from None

        log.info(
            "serving",
            extra={
                "address": str(address),
                "snapshotters": ",".join(
                    f"{sc.name}={sc.backend}:{sc.root}" for sc in config.snapshotters
                ),
                "metrics": config.metrics_address or "off",
                "pid": os.getpid(),
            },
        )
        _notify_systemd("READY=1")

    def _start_fastpath(self) -> FastPath | None:
        """The fast path, if enabled and a snapshotter can take it; leftovers removed."""
        fast = self.config.fast_path
        able = [name for name, store in self._stores.items() if layer_converter(store) is not None]
        for name in able:
            # Temporary snapshots of a server killed mid-layer.
            for key in remove_abandoned(self._stores[name]):
                log.info("removed abandoned fast-path snapshot", extra={"key": key})
        if not fast.enabled or not able:
            return None
        if not fast.containerd_address.is_socket():
            # Not fatal (containerd may start after us), but every layer falls back until then.
            log.warning(
                "layer fast path: no containerd socket yet; layers fall back until there is one",
                extra={"containerd_address": str(fast.containerd_address)},
            )
        log.info(
            "layer fast path on",
            extra={
                "snapshotters": ",".join(able),
                "containerd_address": str(fast.containerd_address),
                "fetch_timeout_s": fast.fetch_timeout,
            },
        )
        return FastPath(fast, self.metrics)

    # -- stop ----------------------------------------------------------------------------

    def stop(self, grace: float | None = None) -> None:
        """Shut down (idempotent; a second caller waits for the first to finish)."""
        with self._state:
            first = self._started and not self._stopping
            self._stopping = True
        if not self._started:
            self._stopped.set()
            return
        if not first:
            self._stopped.wait()
            return
        grace = self.config.shutdown_timeout if grace is None else grace
        log.info("shutting down", extra={"grace_s": grace})
        _notify_systemd("STOPPING=1")
        try:
            self._teardown(grace)
        finally:
            self._stopped.set()
        log.info("stopped")

    def cancel_calls(self) -> None:
        """Cancel in-flight calls now (a second SIGTERM/SIGINT during shutdown)."""
        if self._grpc is not None:
            self._grpc.stop(0)

    def _teardown(self, grace: float = 0.0) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self._bind_dir is not None:
            os.close(self._bind_dir)
            self._bind_dir = None
        if self._service is not None:
            self._service.shut()
            # Cancelled calls can still be inside a store: let them leave it first.
            left = self._service.drain(timeout=grace + 5.0)
            if left:
                log.warning("closing stores with calls still running", extra={"calls": left})
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._service is not None:
            self._service.close()
        if self._fastpath is not None:
            self._fastpath.close()
        for name, store in self._stores.items():
            try:
                store.close()
            except Exception:
                log.exception("cannot close snapshotter", extra={"snapshotter": name})
        self._stores.clear()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._socket_id is not None:
            self._remove_socket(self._socket_id)
            self._socket_id = None
        for lock in reversed(self._locks):
            lock.release()
        self._locks.clear()

    def _remove_socket(self, socket_id: tuple[int, int]) -> None:
        # Only the socket this server made: a successor may already own the path.
        try:
            st = os.lstat(self.address)
            if (st.st_dev, st.st_ino) == socket_id:
                os.unlink(self.address)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove socket", extra={"address": str(self.address), "error": e})

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- the command -------------------------------------------------------------------------


def serve(config: Config, *, log_stream: IO[str] | None = None) -> None:
    """Run the server until SIGTERM or SIGINT (``stratasnap serve``).

    Raises :class:`DaemonError` when it cannot start. A second signal during
    the shutdown cancels the calls still running instead of waiting for them.
    Must be called from the main thread (signal handlers).
    """
    configure_logging(config.log_level, log_stream)
    server = Server(config)
    requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if requested.is_set():
            log.warning("signal during shutdown: cancelling calls", extra={"signal": name})
            server.cancel_calls()
            return
        log.info("signal received", extra={"signal": name})
        requested.set()

    previous: dict[int, Any] = {
        s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        server.start()
        while not requested.wait(1.0):
            pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
