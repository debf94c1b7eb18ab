"""A private containerd using a private stratasnap server as its proxy snapshotter.

:class:`Stack` owns everything under one base directory (put it on tmpfs or
a fresh loop filesystem: this machine's root filesystem is very slow at
creating files)::

    <base>/stratasnap/root          the server's --root
    <base>/stratasnap/config.toml   the server's config (backend and its options; the fast
                                    path reads from this containerd)
    <base>/run/stratasnap.sock      the server's --address
    <base>/containerd/config.toml   containerd's generated config: root, state, socket,
                                    [proxy_plugins.stratasnap], CRI disabled
    <base>/containerd/{root,state,opt}
    <base>/containerd/containerd.sock
    <base>/logs/{stratasnap,containerd}.log

Both daemons are started as subprocesses and stopped by PID (SIGTERM, then
SIGKILL); :meth:`Stack.close` also kills the runc shims this containerd
started, and unmounts whatever is left mounted below ``base``. Everything is
driven with ``ctr --address <sock> -n <namespace>``.

No pytest here: ``benchmarks/containerd.py`` uses it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "REQUIRED_TOOLS",
    "CommandFailed",
    "Daemon",
    "HarnessError",
    "Stack",
    "mounts_below",
    "unmount_below",
]

#: What the stack runs besides Python: containerd, its CLI, the runc shim and runc.
REQUIRED_TOOLS = ("containerd", "ctr", "containerd-shim-runc-v2", "runc")

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class HarnessError(RuntimeError):
    """A daemon did not start (or stop); the message carries the end of its log."""


class CommandFailed(AssertionError):
    """A command exited non-zero; the message has its output and the daemons' logs."""

    def __init__(self, message: str, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(message)
        self.result = result


def _env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PATH", "")
    missing = [p for p in _SYSTEM_PATH.split(":") if p not in path.split(":")]
    env["PATH"] = ":".join(filter(None, [path, *missing]))
    for var in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER"):
        env.pop(var, None)
    return env


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' if there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Daemon:
    """A long-running process with a log file, ready once its unix socket accepts."""

    def __init__(self, name: str, argv: Sequence[str], socket_path: Path, log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.socket_path = socket_path
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            raise HarnessError(f"{self.name} is already running (pid {self.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(),
                cwd="/",  # never a directory whose files shadow modules (benchmarks/grpc.py)
                start_new_session=True,  # a ^C to the test run is not sent to it
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"{self.name} exited with status {self.proc.returncode} while starting;"
                    f" end of {self.log}:\n{tail(self.log)}"
                )
            if self.socket_path.exists() and _connectable(self.socket_path):
                return
            time.sleep(0.02)
        self.stop()
        raise HarnessError(
            f"{self.name} did not listen on {self.socket_path} within {timeout}s;"
            f" end of {self.log}:\n{tail(self.log)}"
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
        self.proc = None
        return proc.returncode


# -- mounts ------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_below(base: Path, include_base: bool = False) -> list[str]:
    """Mount points below ``base`` in mount order (the last one mounted last)."""
    prefix = str(base).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mnt = _unescape(line.split()[1])
        if mnt.startswith(prefix) or (include_base and mnt == str(base)):
            found.append(mnt)
    return found


def unmount_below(base: Path, include_base: bool = False) -> list[str]:
    """Lazily unmount everything below ``base``, most recent first; returns what was."""
    done = []
    for _ in range(3):  # stacked mounts show up again once the top one is gone
        left = mounts_below(base, include_base)
        if not left:
            break
        for mnt in reversed(left):
            r = subprocess.run(["umount", "-l", mnt], capture_output=True)
            if r.returncode == 0:
                done.append(mnt)
    return done


# -- the stack ---------------------------------------------------------------------------


class Stack:
    """stratasnap (``backend``) served to a containerd of our own, all below ``base``.

    ``snapshotter`` is the proxy plugin's name (what ``--snapshotter`` selects).
    """

    def __init__(
        self,
        base: Path,
        backend: str = "native",
        *,
        snapshotter: str = "stratasnap",
        namespace: str = "stratasnap-e2e",
        backend_options: Mapping[str, object] | None = None,
        log_level: str = "debug",
        python: str = sys.executable,
        fast_path: Mapping[str, object] | None = None,
        metrics_address: str = "",
    ) -> None:
        self.base = base
        self.backend = backend
        self.snapshotter = snapshotter
        self.namespace = namespace
        self.backend_options = dict(backend_options or {})
        #: ``[fast_path]`` settings; containerd_address is always this stack's containerd.
        self.fast_path = dict(fast_path or {})
        self.metrics_address = metrics_address
        #: Filesystems mounted below ``base`` for the store before the daemons ran
        #: (the btrfs backend's loop filesystem): not theirs to leave or clean.
        self.own_mounts: list[str] = []
        self.logs = base / "logs"
        self.ss_root = base / "stratasnap" / "root"
        self.ss_config = base / "stratasnap" / "config.toml"
        self.ss_socket = base / "run" / "stratasnap.sock"
        self.cd_dir = base / "containerd"
        self.cd_root = self.cd_dir / "root"
        self.cd_state = self.cd_dir / "state"
        self.cd_config = self.cd_dir / "config.toml"
        self.cd_socket = self.cd_dir / "containerd.sock"
        self.python = python
        self.stratasnapd = Daemon(
            "stratasnap",
            [
                python,
                "-m",
                "stratasnap.server",
                "serve",
                "--config",
                str(self.ss_config),
                "--log-level",
                log_level,
            ],
            self.ss_socket,
            self.logs / "stratasnap.log",
        )
        self.containerd = Daemon(
            "containerd",
            ["containerd", "--config", str(self.cd_config)],
            self.cd_socket,
            self.logs / "containerd.log",
        )
        self._write_configs()

    # -- configuration -------------------------------------------------------------------

    def _write_configs(self) -> None:
        for d in (self.logs, self.ss_root.parent, self.ss_socket.parent, self.cd_dir):
            d.mkdir(parents=True, exist_ok=True)
        options = ", ".join(
            f"{json.dumps(k)} = {json.dumps(v)}" for k, v in self.backend_options.items()
        )
        self.ss_config.write_text(
            "version = 1\n"
            f"address = {json.dumps(str(self.ss_socket))}\n"
            f"metrics_address = {json.dumps(self.metrics_address)}\n"
            "shutdown_timeout = 5.0\n"
            f"[snapshotters.{self.snapshotter}]\n"
            f"backend = {json.dumps(self.backend)}\n"
            f"root = {json.dumps(str(self.ss_root))}\n"
            f"options = {{{options}}}\n"
            + "[fast_path]\n"
            + f"containerd_address = {json.dumps(str(self.cd_socket))}\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.fast_path.items())
        )
        q = json.dumps
        self.cd_config.write_text(
            "version = 2\n"
            f"root = {q(str(self.cd_root))}\n"
            f"state = {q(str(self.cd_state))}\n"
            # Starts fast; nothing here needs Kubernetes.
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f"  address = {q(str(self.cd_socket))}\n"
            "[ttrpc]\n"
            f"  address = {q(str(self.cd_socket) + '.ttrpc')}\n"
            "[debug]\n"
            '  level = "info"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f"  path = {q(str(self.cd_dir / 'opt'))}\n"
            f"[proxy_plugins.{self.snapshotter}]\n"
            '  type = "snapshot"\n'
            f"  address = {q(str(self.ss_socket))}\n"
        )

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Stack:
        self.stratasnapd.start()
        self.containerd.start()
        return self

    def restart_containerd(self) -> None:
        self.containerd.stop()
        self.containerd.start()

    def restart_stratasnap(self) -> None:
        self.stratasnapd.stop()
        self.stratasnapd.start()

    def shim_pids(self) -> list[int]:
        """PIDs of the shims serving this containerd (their ``-address`` is our socket)."""
        pids = []
        want = str(self.cd_socket).encode()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and want in argv:
                pids.append(int(entry.name))
        return pids

    def close(self) -> None:
        """Stop both daemons (best effort, any state), kill our shims, unmount below base."""
        if self.containerd.running:
            with contextlib.suppress(Exception):
                for task in self.ctr("tasks", "ls", "-q", check=False, timeout=20).stdout.split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=20)
                    self.ctr("tasks", "delete", "-f", task, check=False, timeout=20)
        self.containerd.stop()
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.stratasnapd.stop()
        unmount_below(self.base)
        self.remove_cgroups()

    def remove_cgroups(self) -> None:
        """Remove the (empty) cgroups containerd made for our namespace (``/<namespace>``)."""
        for top in [Path("/sys/fs/cgroup"), *Path("/sys/fs/cgroup").glob("*")]:
            group = top / self.namespace
            if not group.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(group), reverse=True):
                with contextlib.suppress(OSError):  # busy (a process left) or not a cgroup
                    os.rmdir(dirpath)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------------

    def log_tails(self, lines: int = 40) -> str:
        parts = []
        for d in (self.containerd, self.stratasnapd):
            parts.append(f"---- end of {d.log} ----\n{tail(d.log, lines)}")
        return "\n".join(parts)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command; with ``check``, a failure raises :class:`CommandFailed` with logs."""
        try:
            result = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                env=_env(),
                cwd="/",
            )
        except subprocess.TimeoutExpired as e:
            result = subprocess.CompletedProcess(
                list(argv), -1, str(e.stdout or ""), f"timed out after {timeout}s"
            )
        if check and result.returncode != 0:
            raise CommandFailed(
                f"command failed (status {result.returncode}): {' '.join(argv)}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{self.log_tails()}",
                result,
            )
        return result

    def ctr(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """``ctr --address <our containerd> -n <namespace> ARGS``."""
        argv = ["ctr", "--address", str(self.cd_socket), "-n", self.namespace, *args]
        return self.run(argv, **kw)  # type: ignore[arg-type]

    def snapshots(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """``ctr snapshots --snapshotter <ours> ARGS``."""
        return self.ctr("snapshots", "--snapshotter", self.snapshotter, *args, **kw)

    def stratasnap(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """Our own CLI on the server's root (reads the same store, directly)."""
        opts = [f"-o{k}={v}" for k, v in self.backend_options.items()]
        argv = [self.python, "-m", "stratasnap", "--root", str(self.ss_root)]
        argv += ["--backend", self.backend, *opts, *args]
        return self.run(argv, **kw)  # type: ignore[arg-type]

    def storage_entries(self) -> list[str]:
        """Names under ``<root>/snapshots`` (ids, ``rm-<id>``, ``new-*``)."""
        try:
            return sorted(os.listdir(self.ss_root / "snapshots"))
        except FileNotFoundError:
            return []
