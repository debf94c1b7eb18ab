"""Crash safety of the native backend: a process killed (SIGKILL) between any two steps.

The scenario and its checks are in ``tests/crashkit.py``, shared with the
other backends' crash tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from crashkit import OPS, CrashRun


@pytest.mark.parametrize("op", sorted(OPS))
def test_kill_at_every_step(op: str, scratch: Path) -> None:
    CrashRun(scratch, "native").kill_at_every_step(op)
