"""Clients that stop reading, or calls that take long, cannot keep other clients waiting.

Each stalled client here opens its own connection (as separate processes
would) and starts a List whose answer is far larger than what gRPC's flow
control lets through unread, then never reads it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from stratasnap.server.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from stratasnap.server.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from stratasnap.server.config import load_config
from stratasnap.server.daemon import Server

# The server below has 16 worker threads and 8 List slots; more stalled
# readers than threads would take them all if Lists were not limited.
WORKERS = 16
STALLED = 20
# A List of every snapshot is ~13 MiB: more than gRPC buffers for a client
# that reads nothing (about 3 MiB here).
SNAPSHOTS = 200
BIG_LABELS = {f"l{i}": "v" * 4000 for i in range(16)}
# Generous for a shared 2-CPU machine; a starved Stat waits for ever (until the
# stalled streams are cut, seconds later).
STAT_DEADLINE = 2.0


@pytest.fixture
def server(scratch: Path) -> Iterator[Server]:
    config = load_config(root=scratch / "root", address=scratch / "s.sock")
    with Server(config, workers=WORKERS, send_timeout=4.0) as s:
        sn = s.snapshotters["stratasnap"]
        for i in range(SNAPSHOTS):
            sn.prepare(f"big-{i}", labels=BIG_LABELS)
        yield s


def stub_for(address: Path) -> tuple[grpc.Channel, Any]:
    # A channel of its own: gRPC would otherwise share one connection (and its
    # flow-control window) between the stalled streams and the Stat.
    channel = grpc.insecure_channel(
        f"unix:{address}", options=[("grpc.use_local_subchannel_pool", 1)]
    )
    return channel, snapshots_pb2_grpc.SnapshotsStub(channel)


def test_stalled_list_readers_do_not_starve_stat(server: Server) -> None:
    stalled: list[tuple[grpc.Channel, Any]] = []
    try:
        for _ in range(STALLED):
            channel, stub = stub_for(server.address)
            # Started, never read: the server blocks sending once the windows are full.
            call = stub.List(pb.ListSnapshotsRequest(snapshotter="stratasnap"))
            stalled.append((channel, call))
        time.sleep(1.0)  # let every List reach its blocked send

        channel, stub = stub_for(server.address)
        with channel:
            for _ in range(20):
                start = time.monotonic()
                info = stub.Stat(
                    pb.StatSnapshotRequest(snapshotter="stratasnap", key="big-0"),
                    timeout=STAT_DEADLINE,
                ).info
                assert info.name == "big-0"
                assert time.monotonic() - start < STAT_DEADLINE
            # Another client's List is answered too (a stream slot, or a clear
            # RESOURCE_EXHAUSTED when every slot is taken), never left hanging.
            try:
                got = sum(
                    len(r.info)
                    for r in stub.List(
                        pb.ListSnapshotsRequest(snapshotter="stratasnap"), timeout=30
                    )
                )
                assert got == SNAPSHOTS
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert "List streams" in (e.details() or "")
    finally:
        for channel, call in stalled:
            call.cancel()
            channel.close()


def test_small_lists_need_no_slot_when_every_slot_is_taken(server: Server) -> None:
    """A List whose answer is sent whatever its client reads is never refused.

    containerd's Walk by a filter answers a few snapshots; with 64 clients at
    once such Lists were refused for want of a slot while they waited for the
    CPU, though none could hold a thread.
    """
    sn = server.snapshotters["stratasnap"]
    for i in range(2 * WORKERS):
        sn.prepare(f"small-{i}", labels={"containerd.io/gc.root": "2026-01-01T00:00:00Z"})
    stalled: list[tuple[grpc.Channel, Any]] = []
    try:
        for _ in range(STALLED):
            channel, stub = stub_for(server.address)
            stalled.append((channel, stub.List(pb.ListSnapshotsRequest(snapshotter="stratasnap"))))
        deadline = time.monotonic() + 30
        while server.service.streams < WORKERS // 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.service.streams == WORKERS // 2  # every slot is taken

        channel, stub = stub_for(server.address)
        with channel:
            for i in range(2 * WORKERS):
                request = pb.ListSnapshotsRequest(
                    snapshotter="stratasnap", filters=[f"name==small-{i}"]
                )
                got = [info.name for r in stub.List(request, timeout=30) for info in r.info]
                assert got == [f"small-{i}"]
            # A big answer still needs a slot, and is refused at once without one.
            with pytest.raises(grpc.RpcError) as caught:
                for _ in stub.List(pb.ListSnapshotsRequest(snapshotter="stratasnap"), timeout=30):
                    pass
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for channel, call in stalled:
            call.cancel()
            channel.close()


def test_stalled_stream_is_cut_after_the_send_timeout(server: Server) -> None:
    channel, stub = stub_for(server.address)
    with channel:
        call = stub.List(pb.ListSnapshotsRequest(snapshotter="stratasnap"))
        deadline = time.monotonic() + 30
        while not server.service.streams and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the stream reached its blocked send, and stays there
        assert server.service.streams == 1
        # The send timeout (4 s) cancels it; the slot is free again.
        deadline = time.monotonic() + 15
        while server.service.streams and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.service.streams == 0
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
        assert caught.value.code() is grpc.StatusCode.CANCELLED


def test_slow_calls_leave_room_for_fast_ones(server: Server) -> None:
    """Calls that block inside the store hold their own thread, not the others' ones.

    Twelve at once would have taken every one of the eight threads stratasnap
    served with before; slow calls are bounded only by the thread pool.
    """
    sn = server.snapshotters["stratasnap"]
    gate = threading.Event()
    real_usage = sn.usage

    def slow_usage(key: str) -> Any:
        gate.wait(30)
        return real_usage(key)

    sn.usage = slow_usage  # type: ignore[method-assign]
    channel, stub = stub_for(server.address)
    calls = []
    try:
        with channel:
            calls = [
                stub.Usage.future(pb.UsageRequest(snapshotter="stratasnap", key="big-1"))
                for _ in range(WORKERS - 4)
            ]
            time.sleep(0.5)
            start = time.monotonic()
            stub.Stat(
                pb.StatSnapshotRequest(snapshotter="stratasnap", key="big-0"),
                timeout=STAT_DEADLINE,
            )
            assert time.monotonic() - start < STAT_DEADLINE
            gate.set()
            assert all(c.result(timeout=30).inodes > 0 for c in calls)
    finally:
        gate.set()
