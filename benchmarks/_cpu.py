"""CPU time per operation of the processes that serve a benchmark, and paired ratios.

On a shared 2-CPU machine wall time follows the neighbours' load: a process
that waits for a CPU is slow by the clock but has done no more work. The CPU
time a server process spends (user + system, all its threads, from
``/proc/<pid>/stat``) moves much less with load, so benchmarks print it per
operation next to wall time. It counts work, not waits: a server that idles
on fsync costs little CPU and much wall time, which is why both are shown.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuMeter", "cpu_seconds", "load", "paired_ratio", "stat_cpu_seconds"]

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads together."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def stat_cpu_seconds(stat: str) -> float:
    """User + system CPU seconds in the text of a ``/proc/<pid>/stat``."""
    # The command name (field 2) may hold spaces and parentheses: fields after
    # the last ')' are fixed; utime and stime are fields 14 and 15 of stat(5).
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass(frozen=True)
class CpuMeter:
    """CPU seconds each named process spent between :meth:`start` and :meth:`stop`."""

    pids: Mapping[str, int]
    before: Mapping[str, float]

    @classmethod
    def start(cls, pids: Mapping[str, int]) -> CpuMeter:
        return cls(dict(pids), {name: cpu_seconds(pid) for name, pid in pids.items()})

    def stop(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self.before[name] for name, pid in self.pids.items()}


def load() -> float:
    """The one-minute load average (the machine is shared: say how busy it was)."""
    return os.getloadavg()[0]


def paired_ratio(this: Sequence[float], ref: Sequence[float]) -> float:
    """Median over rounds of this/ref measured in the same round.

    Neighbours' load drifts over a run; a ratio taken within a round (the two
    sides seconds apart) cancels most of it, a ratio of medians does not.
    """
    if len(this) != len(ref) or not this:
        raise ValueError(f"need as many rounds on each side, not {len(this)} and {len(ref)}")
    return statistics.median(t / r for t, r in zip(this, ref, strict=True))
