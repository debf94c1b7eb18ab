"""Prepare + commit through a real containerd, each side and round on a fresh stack.

What containerd (1.6) calls on a snapshotter per image layer it unpacks
(``unpacker.go``): Stat(chainID) is answered by its own metadata (bolt) and
reaches the snapshotter only when the layer exists; then Prepare(extract key,
parent chain ID), the apply (containerd mounts what Prepare returned), and
Commit(chainID, key). Running a container adds Prepare (and Mounts) of its
writable layer. Per layer a snapshotter is thus asked for one Prepare and one
Commit, each wrapped by containerd's metadata layer in its own bolt
transactions (a Commit runs the snapshotter's Commit inside containerd's write
transaction). A cycle here is that pair, sent with the snapshots API to
containerd (which adds its metadata, as for an unpack) in chains of
``CHAIN`` layers, the depth of containerd's benchsuite.

Sides, each on its own fresh loop filesystem with its own containerd (and
plugin) started for the round, so no side inherits another's database, journal
or writeback:

- ``overlayfs``: containerd's built-in overlay snapshotter (the reference);
- ``go-overlay``: the same Go overlay snapshotter as a *proxy plugin*
  (``goproxy/``): minus ``overlayfs`` is what the proxy hop itself costs;
- ``ss-<backend>``: stratasnap as a proxy plugin: minus ``go-overlay`` is
  what stratasnap costs over containerd's own code behind the same hop;
- ``... direct``: the same plugin called straight on its socket, no containerd.

Per cycle it prints wall time and CPU time of containerd and of the plugin
process (user + system, all threads, from ``/proc``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from _cpu import CpuMeter, load, paired_ratio
from _rounds import rotated
from _scratch import scratch_fs
from e2e.harness import Daemon, Stack

from stratasnap.server.client import Client

#: Layers per chain (containerd's benchsuite shape); each chain starts at no parent.
CHAIN = 16
#: Untimed cycles first: connections, caches, the first file of each database.
WARMUP = 16
GC_ROOT = "containerd.io/gc.root"
BUILTIN = "overlayfs"
GO = "go-overlay"
DIRECT = " direct"


@dataclass(frozen=True)
class CycleRound:
    wall: float  # seconds per cycle
    containerd_cpu: float  # CPU seconds per cycle
    plugin_cpu: float
    load: float

    @property
    def cpu(self) -> float:
        return self.containerd_cpu + self.plugin_cpu


class SideStack(Stack):
    """A :class:`Stack` whose snapshotter is containerd's own (no plugin), containerd's
    overlay behind ``goproxy`` (``go``), or stratasnap's ``backend``."""

    def __init__(self, base: Path, side: str, goproxy: Path) -> None:
        self.side = side.removesuffix(DIRECT)
        name = self.side if self.side != BUILTIN else "unused-plugin"
        backend = self.side.removeprefix("ss-") if self.side.startswith("ss-") else "overlay"
        super().__init__(base, backend, snapshotter=name, namespace="cycles", log_level="info")
        if self.side == GO:
            root = base / "goproxy" / "root"
            root.mkdir(parents=True)
            argv = [str(goproxy), "-root", str(root), "-address", str(self.ss_socket)]
            self.stratasnapd = Daemon(GO, argv, self.ss_socket, self.logs / "goproxy.log")

    @property
    def plugin(self) -> Daemon | None:
        return None if self.side == BUILTIN else self.stratasnapd

    def start(self) -> SideStack:
        if self.plugin is not None:
            self.plugin.start()
        self.containerd.start()
        return self


def one_round(side: str, goproxy: Path, fs: str, cycles: int, tag: str) -> CycleRound:
    with scratch_fs(fs, "2G") as (mnt, _desc):
        stack = SideStack(mnt / "stack", side, goproxy)
        try:
            stack.start()
            direct = side.endswith(DIRECT)
            name = side.removesuffix(DIRECT)
            if direct:
                client = Client(stack.ss_socket, snapshotter=name)
            else:
                client = Client(stack.cd_socket, snapshotter=name, namespace="cycles")
            pids = {"containerd": stack.containerd.pid or 0}
            if stack.plugin is not None:
                pids["plugin"] = stack.plugin.pid or 0
            with client:
                client.wait_ready()
                labels = {GC_ROOT: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
                run_cycles(client, f"{tag}-warm", WARMUP, labels)
                meter = CpuMeter.start(pids)
                t0 = time.perf_counter()
                run_cycles(client, tag, cycles, labels)
                wall = time.perf_counter() - t0
                cpu = meter.stop()
        finally:
            stack.close()
    return CycleRound(
        wall / cycles, cpu["containerd"] / cycles, cpu.get("plugin", 0.0) / cycles, load()
    )


def run_cycles(client: Client, tag: str, n: int, labels: dict[str, str]) -> None:
    """``n`` prepare + commit pairs, in chains of :data:`CHAIN` layers."""
    parent = ""
    for i in range(n):
        key, name = f"{tag}/extract-{i}", f"{tag}/layer-{i}"
        client.prepare(key, "" if i % CHAIN == 0 else parent, labels)
        client.commit(name, key, labels)
        parent = name


def run(
    sides: Sequence[str], goproxy: Path, fs: str, cycles: int, rounds: int
) -> dict[str, list[CycleRound]]:
    """Every side once per round; the order rotates, so each side goes first as often."""
    out: dict[str, list[CycleRound]] = {s: [] for s in sides}
    for r in range(rounds):
        for side in rotated(sides, r):
            res = one_round(side, goproxy, fs, cycles, f"r{r}")
            out[side].append(res)
            print(
                f"  round {r + 1}: {side:<20} {res.wall * 1e3:6.2f} ms/cycle, cpu containerd "
                f"{res.containerd_cpu * 1e3:5.2f} + plugin {res.plugin_cpu * 1e3:5.2f} ms, "
                f"load {res.load:4.1f}",
                flush=True,
            )
    return out


def report(results: dict[str, list[CycleRound]]) -> list[str]:
    ref = results[BUILTIN]
    lines = [
        "",
        f"{'prepare+commit':<20}{'wall ms':>9}{'ratio':>8}{'cpu ms':>9}{'ratio':>8}"
        f"{'containerd':>12}{'plugin':>9}",
    ]
    for side, rs in results.items():
        wall = statistics.median(x.wall for x in rs)
        cpu = statistics.median(x.cpu for x in rs)
        via = not side.endswith(DIRECT)
        wr = f"{paired_ratio([x.wall for x in rs], [x.wall for x in ref]):7.2f}x" if via else ""
        cr = f"{paired_ratio([x.cpu for x in rs], [x.cpu for x in ref]):7.2f}x" if via else ""
        lines.append(
            f"{side:<20}{wall * 1e3:9.2f}{wr:>8}{cpu * 1e3:9.2f}{cr:>8}"
            f"{statistics.median(x.containerd_cpu for x in rs) * 1e3:12.2f}"
            f"{statistics.median(x.plugin_cpu for x in rs) * 1e3:9.2f}"
        )
    lines.append(
        "  ratios: median of per-round ratios against overlayfs (built in); cpu = containerd"
        " + plugin process, user+sys per cycle"
    )
    for side, rs in results.items():
        theirs = results.get(GO + DIRECT if side.endswith(DIRECT) else GO)
        if side.startswith("ss-") and theirs is not None:
            lines.append(
                f"  {side} / {GO}{DIRECT if side.endswith(DIRECT) else ''}: {_ratios(rs, theirs)}"
                " (stratasnap against containerd's overlay behind the same hop)"
            )
    if GO in results:
        lines.append(f"  {GO} / {BUILTIN}: {_ratios(results[GO], ref)} (the proxy hop)")
    lines.append("  target (issue 12): ss-overlay <= 1.2x overlayfs, wall")
    return lines


def _ratios(this: Sequence[CycleRound], ref: Sequence[CycleRound]) -> str:
    wall = paired_ratio([x.wall for x in this], [x.wall for x in ref])
    cpu = paired_ratio([x.cpu for x in this], [x.cpu for x in ref])
    return f"wall {wall:.2f}x, cpu {cpu:.2f}x"
