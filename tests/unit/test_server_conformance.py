"""The shipped conformance suite, run through the gRPC server on a unix socket.

Every contract case (errors, Update fieldpaths, Walk filters, rebase, usage…)
goes client -> socket -> servicer -> native backend and back, so the wire
conversions (Kind, timestamps, labels, mounts, error codes and messages) are
checked against the same expectations as the library itself.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from stratasnap.server.client import Client
from stratasnap.server.config import Config
from stratasnap.server.daemon import Server
from stratasnap.snapshotter import Snapshotter
from stratasnap.testing import SnapshotterConformance

_seq = itertools.count()


class RemoteSnapshotter(Client):
    """A client whose close() also stops the server it came with."""

    def __init__(self, server: Server) -> None:
        super().__init__(server.address, namespace="conformance", timeout=60)
        self.server = server

    def close(self) -> None:
        super().close()
        self.server.stop()


class TestOverGrpc(SnapshotterConformance):
    backend = "native"

    @pytest.fixture
    def snapshot_root(self, scratch: Path) -> Path:
        return scratch / "root"

    def open_snapshotter(self, root: Path) -> Snapshotter:
        sock = root.parent / f"s{next(_seq)}.sock"
        server = Server(Config(root=root, address=sock, backend=self.backend))
        server.start()
        return RemoteSnapshotter(server)

    def test_cleanup_reclaims_leftovers_only(self, sn: Snapshotter, snapshot_root: Path) -> None:
        # Cleanup answers Empty on the wire: check the disk (and the metric) instead.
        assert isinstance(sn, RemoteSnapshotter)
        sn.prepare("keep-a")
        sn.commit("keep", "keep-a")
        sn.prepare("active", "keep")
        snaps = snapshot_root / "snapshots"
        owned = set(os.listdir(snaps))
        for name in ("new-999999", "rm-888888", "777777"):
            (snaps / name / "sub").mkdir(parents=True)
            (snaps / name / "sub" / "f").write_bytes(b"x" * 10000)
        sn.cleanup()
        assert set(os.listdir(snaps)) == owned
        reclaimed = sn.server.metrics.registry.get_sample_value(
            "stratasnap_cleanup_reclaimed_bytes_total", {"snapshotter": "stratasnap"}
        )
        assert reclaimed is not None and reclaimed >= 30000
        sn.cleanup()
        assert set(os.listdir(snaps)) == owned
