"""The benchmarks' CPU-time and ratio helpers (benchmarks/_cpu.py): what the figures rest on."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_cpu", Path(__file__).resolve().parents[2] / "benchmarks" / "_cpu.py"
)
assert _SPEC is not None and _SPEC.loader is not None
cpu = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_cpu"] = cpu  # dataclasses look their module up while it loads
_SPEC.loader.exec_module(cpu)

TICK = os.sysconf("SC_CLK_TCK")


def _busy() -> float:
    t = os.times()
    return t.user + t.system


def test_meter_counts_this_process_user_plus_system() -> None:
    meter = cpu.CpuMeter.start({"me": os.getpid()})
    t0 = _busy()
    while _busy() - t0 < 0.3:
        pass
    expected = _busy() - t0
    spent = meter.stop()["me"]
    # Both count clock ticks of the same process: a few ticks apart at most.
    assert abs(spent - expected) < 5 / TICK + 0.02, (spent, expected)


def test_stat_fields_are_counted_from_the_last_parenthesis() -> None:
    # The command name may hold spaces and ") (": utime and stime are fields 14
    # and 15 only when counted from the last ')'.
    rest = "S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0"
    assert cpu.stat_cpu_seconds(f"42 (evil) (name 1 2) {rest}") == 300 / TICK
    assert cpu.stat_cpu_seconds(f"42 (plain) {rest}") == 300 / TICK


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    # Round 2 ran under heavy load on both sides: its ratio counts once, where a
    # ratio of medians would set figures from different rounds against each other.
    assert cpu.paired_ratio([2.0, 20.0, 3.0], [1.0, 10.0, 1.0]) == 2.0
    assert cpu.paired_ratio([1.0], [4.0]) == 0.25
    with pytest.raises(ValueError):
        cpu.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        cpu.paired_ratio([], [])
