"""Who may use the socket: a non-root user only through ``socket_group`` (needs root)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from conftest import need_root

from stratasnap.server.config import load_config
from stratasnap.server.daemon import Server

pytestmark = pytest.mark.privileged

NOBODY = 65534


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def _connects_as(uid: int, gid: int, path: Path) -> bool:
    """Whether user ``uid`` (in group ``gid`` only) may connect to ``path``."""
    pid = os.fork()
    if pid == 0:  # the child: drop to uid/gid, try, report with the exit status
        code = 3
        try:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                code = 0
            except PermissionError:
                code = 1
            finally:
                s.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"child failed ({code})"
    return code == 0


@pytest.fixture
def open_dir(scratch: Path) -> Path:
    os.chmod(scratch, 0o755)  # let other users reach the socket's directory
    return scratch


def test_owner_only_socket_refuses_other_users(open_dir: Path) -> None:
    config = load_config(root=open_dir / "root", address=open_dir / "run" / "s.sock")
    with Server(config) as server:
        assert not _connects_as(NOBODY, NOBODY, server.address)
        assert _connects_as(0, 0, server.address)


def test_socket_group_lets_its_members_in(open_dir: Path) -> None:
    group = 4242
    config = load_config(
        root=open_dir / "root", address=open_dir / "run" / "s.sock", socket_group=str(group)
    )
    with Server(config) as server:
        assert os.stat(server.address).st_gid == group
        assert _connects_as(NOBODY, group, server.address)
        assert not _connects_as(NOBODY, NOBODY, server.address)
