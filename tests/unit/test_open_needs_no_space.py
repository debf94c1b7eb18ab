"""Opening a root takes nothing from its filesystem (issue 14): the checks read, the
locks are on directories that exist, and a pid that does not fit is only not written.
The runs on a really full filesystem are in tests/privileged/test_full_disk.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from stratasnap.fs import overlay_probe
from stratasnap.server.client import Client
from stratasnap.server.config import load_config
from stratasnap.server.daemon import LOCK_NAME, DaemonError, Server


def _no_room(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_d_type_check_reads_the_entries_already_there(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (scratch / "snapshots").mkdir()
    (scratch / "metadata.db").write_bytes(b"")
    monkeypatch.setattr("stratasnap.fs.overlay_probe.tempfile.mkdtemp", _no_room)
    assert overlay_probe.supports_d_type(scratch)  # tmpfs and ext4 fill in d_type
    # Only an empty directory needs a probe file (and a full disk then says so).
    (scratch / "empty").mkdir()
    with pytest.raises(OSError, match="No space"):
        overlay_probe.supports_d_type(scratch / "empty")


def test_server_lock_needs_no_lock_file(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def open_but_no_lock_file(path: Any, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path).endswith(LOCK_NAME):
            _no_room()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_but_no_lock_file)
    root = scratch / "root"
    with Server(load_config(root=root, address=scratch / "a.sock")) as first:
        with Client(first.address) as client:
            client.prepare("works")
        # Still one server per root: the lock is on the directory itself.
        with pytest.raises(DaemonError, match="already serving root") as refused:
            Server(load_config(root=root, address=scratch / "b.sock")).start()
        # No pid recorded, so none claimed.
        assert "another stratasnap server is already serving" in str(refused.value)
    assert not (root / LOCK_NAME).exists()
