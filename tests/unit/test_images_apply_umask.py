"""The applier reads the process umask without setting it (other threads may be creating files)."""

from __future__ import annotations

import os

import pytest

from stratasnap.images import apply


def test_umask_is_read_without_being_set(monkeypatch: pytest.MonkeyPatch) -> None:
    old = os.umask(0o027)
    try:

        def refuse(mask: int) -> int:
            raise AssertionError(f"os.umask({mask:#o}) called: racy with other threads")

        monkeypatch.setattr("stratasnap.images.apply.os.umask", refuse)
        assert apply._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)
