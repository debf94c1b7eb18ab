"""Kill campaign: SIGKILL a snapshotter server again and again amid layers in and out.

Run: ``.venv/bin/python benchmarks/killcampaign.py`` as root (loop devices,
overlayfs). For each target, on its own fresh ext4 loop filesystem
(``--size``, 2 GiB by default), a client (stratasnap's gRPC client, the
snapshots API containerd speaks) runs :class:`stratasnap.testing.churn.Churn`:
layers of ``--layer-mib`` prepared, written and committed, the oldest
removed beyond ``--keep``, a container snapshot coming and going, and never
a Cleanup. The server is killed with SIGKILL ``--kills`` times (a random
moment after it is ready, every fourth time while it starts) and restarted
each time. Targets:

- ``stratasnap-overlay``: ``stratasnap serve --backend overlay`` (its default,
  sync_remove=false: the reaper deletes removed storage in the background);
- ``containerd-overlayfs``: containerd's own overlayfs snapshotter (Debian's
  containerd Go packages) served by ``goproxy/`` with ``-async-remove``, the
  default of containerd's overlayfs plugin (Remove renames, Cleanup deletes).

Reported per target: kills (and how many hit a start), restarts that came
up, restarts that did not (with the reason), the median time to ready, steps, how often the disk was
full, inconsistencies (committed layers lost or read back wrong, found by
reading every layer through a view after the last start), free space at the
end before Cleanup, what Cleanup then gave back, and orphans after Cleanup
(entries under ``snapshots/`` no snapshot owns). The machine may be shared:
times are indicative; the counts are the point. Never pass/fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The real grpc package before this directory (which holds grpc.py) is on sys.path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import grpc  # noqa: E402, F401

sys.path.insert(0, str(HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import suppress  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

from _gobuild import build_go  # noqa: E402
from _scratch import scratch_fs  # noqa: E402

from stratasnap.errors import SnapshotError  # noqa: E402
from stratasnap.server.client import Client  # noqa: E402
from stratasnap.testing.churn import Churn  # noqa: E402
from stratasnap.testing.diskfill import free_space  # noqa: E402

MiB = 1 << 20
TARGETS = ("stratasnap-overlay", "containerd-overlayfs")
READY_TIMEOUT_S = 60.0
#: Consecutive failed restarts after which a target counts as locked out.
LOCKED_OUT_AFTER = 3


@dataclass
class Result:
    target: str
    filesystem: str
    kills: int = 0
    killed_starting: int = 0
    restarts_ok: int = 0
    restarts_failed: int = 0
    first_failure: str = ""
    locked_out_at_kill: int | None = None
    ready_median_s: float = 0.0
    steps: int = 0
    disk_full: int = 0
    inconsistencies: int = 0
    free_before_cleanup_mib: float = 0.0
    cleanup_reclaimed_mib: float = 0.0
    orphans_after_cleanup: int = 0
    seconds: float = 0.0
    ready_times: list[float] = field(default_factory=list, repr=False)


class Server:
    """One target's server process, started again after every kill."""

    def __init__(self, argv: list[str], address: Path, log: Path) -> None:
        self.argv, self.address, self.log = argv, address, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=err)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> str:
        """ "" when it accepts connections, else why not (it exited, or timed out)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                return f"exited with {self.proc.returncode}: {' '.join(tail)[:300]}"
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.address))
                    return ""
                except OSError:
                    time.sleep(0.01)
        return f"not ready after {timeout}s"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def server_for(
    target: str, root: Path, address: Path, log: Path, goproxy: Path | None, python: str
) -> Server:
    if target == "stratasnap-overlay":
        argv = [python, "-m", "stratasnap", "serve", "--root", str(root)]
        argv += ["--address", str(address), "--backend", "overlay", "--log-level", "warning"]
    else:
        if goproxy is None:
            raise SystemExit("containerd-overlayfs needs benchmarks/goproxy built (see --help)")
        argv = [str(goproxy), "-address", str(address), "-root", str(root)]
        argv += ["-snapshotter", "overlayfs", "-async-remove"]
    return Server(argv, address, log)


def campaign(target: str, args: argparse.Namespace, goproxy: Path | None) -> Result:
    rng = random.Random(args.seed)
    with scratch_fs("ext4", args.size) as (mnt, desc), tempfile.TemporaryDirectory() as tmp:
        result = Result(target=target, filesystem=desc)
        root = mnt / "root"
        server = server_for(
            target, root, Path(tmp) / "s.sock", Path(tmp) / "server.log", goproxy, args.python
        )
        churn = Churn(layer_bytes=args.layer_mib * MiB, keep=args.keep)
        t0 = time.monotonic()
        failed_in_a_row = 0
        try:
            while result.kills < args.kills:
                started = time.monotonic()
                server.start()
                if result.kills % 4 == 3:  # while it starts
                    time.sleep(rng.uniform(0.0, args.start_kill_s))
                    result.killed_starting += 1
                else:
                    why = server.wait_ready()
                    if why:
                        result.restarts_failed += 1
                        result.first_failure = result.first_failure or why
                        failed_in_a_row += 1
                        server.kill()
                        if failed_in_a_row >= LOCKED_OUT_AFTER:
                            result.locked_out_at_kill = result.kills
                            break
                        continue
                    failed_in_a_row = 0
                    result.restarts_ok += 1
                    result.ready_times.append(time.monotonic() - started)
                    assert server.proc is not None
                    timer = threading.Timer(rng.uniform(0.05, args.max_run_s), server.kill)
                    timer.start()
                    with Client(server.address, timeout=30) as client, suppress(SnapshotError):
                        churn.resync(client)
                        churn.run(client)
                    timer.join()
                server.kill()
                result.kills += 1
            if result.locked_out_at_kill is None:
                finish(server, root, churn, result)
        finally:
            server.kill()
        result.steps, result.disk_full = churn.n, churn.full
        result.seconds = round(time.monotonic() - t0, 1)
        if result.ready_times:
            result.ready_median_s = round(statistics.median(result.ready_times), 3)
        print(f"  {target}: server log {server.log.stat().st_size} bytes", file=sys.stderr)
    return result


def finish(server: Server, root: Path, churn: Churn, result: Result) -> None:
    """The last start: let removals settle, Cleanup, audit every layer, Cleanup, count."""
    server.start()
    why = server.wait_ready()
    if why:
        result.restarts_failed += 1
        result.first_failure = result.first_failure or why
        return
    result.restarts_ok += 1
    fs = root.parent
    with Client(server.address, timeout=120) as client:
        churn.resync(client)
        time.sleep(2.0)  # a background reaper's moment (containerd's has none)
        before = free_space(fs).bytes
        result.free_before_cleanup_mib = round(before / MiB, 1)
        client.cleanup()
        result.cleanup_reclaimed_mib = round((free_space(fs).bytes - before) / MiB, 1)
        # Reading the layers back takes a view each: room first, then the audit.
        audit = churn.audit(client)
        result.inconsistencies = len(audit.bad) + len(churn.lost)
        time.sleep(2.0)
        client.cleanup()  # the audit's own views, where Remove leaves them to Cleanup
    entries = set(os.listdir(root / "snapshots"))
    result.orphans_after_cleanup = len(entries - audit.storage)
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Builds benchmarks/goproxy (Go, GOPATH mode, Debian's containerd sources) "
        "for the containerd target. Prints one table row and one JSON line per target.",
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: %(default)s")
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs per target (%(default)s)")
    parser.add_argument("--size", default="2G", help="filesystem size (%(default)s)")
    parser.add_argument("--layer-mib", type=int, default=8, help="MiB per layer (%(default)s)")
    parser.add_argument("--keep", type=int, default=6, help="committed layers kept (%(default)s)")
    parser.add_argument(
        "--max-run-s", type=float, default=1.0, help="latest kill after ready, s (%(default)s)"
    )
    parser.add_argument(
        "--start-kill-s", type=float, default=0.5, help="latest kill while starting (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter whose stratasnap serves (another checkout's .venv/bin/python "
        "to compare a version; default: this one)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: loop filesystems and overlayfs")
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown target(s) {', '.join(sorted(unknown))}; known: {TARGETS}")
    with tempfile.TemporaryDirectory(prefix="stratasnap-goproxy-") as gotmp:
        goproxy = None
        if "containerd-overlayfs" in targets:
            goproxy, note = build_go("goproxy", Path(gotmp), "the containerd target")
            print(note, file=sys.stderr)
        print(
            f"{args.kills} kills per target, {args.layer_mib} MiB layers, keep {args.keep}, "
            f"no Cleanup until the end; a shared 2-vCPU machine: times are indicative"
        )
        results = [campaign(t, args, goproxy) for t in targets]
    header = (
        "target", "kills", "of them starting", "up", "failed", "ready s", "steps", "full",
        "incons.", "free MiB", "cleanup MiB", "orphans",
    )  # fmt: skip
    print(" | ".join(header))
    for r in results:
        row = (
            r.target, r.kills, r.killed_starting, r.restarts_ok, r.restarts_failed,
            r.ready_median_s, r.steps, r.disk_full, r.inconsistencies,
            r.free_before_cleanup_mib, r.cleanup_reclaimed_mib, r.orphans_after_cleanup,
        )  # fmt: skip
        print(" | ".join(str(c) for c in row))
        if r.first_failure:
            lock = f" (locked out at kill {r.locked_out_at_kill})" if r.locked_out_at_kill else ""
            print(f"  {r.target}: first failed restart{lock}: {r.first_failure}")
    for r in results:
        data = asdict(r)
        data.pop("ready_times")
        print(json.dumps(data))


if __name__ == "__main__":
    main()
