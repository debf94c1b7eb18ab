"""Every RPC of the snapshots service through a real gRPC client on the unix socket.

The raw generated stub is used where the wire itself is the point (field
numbers, Kind values, timestamps, batches, status codes and messages); the
typed :class:`Client` elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import field_mask_pb2

from stratasnap.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SnapshotError,
    Unavailable,
    Unimplemented,
)
from stratasnap.server.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from stratasnap.server.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from stratasnap.server.client import Client
from stratasnap.server.config import Config, SnapshotterConfig, load_config
from stratasnap.server.daemon import Server
from stratasnap.server.service import from_timestamp, to_timestamp
from stratasnap.snapshotter import Snapshotter
from stratasnap.types import Info, Kind, Reclaimed, Timestamp

NS = (("containerd-namespace", "k8s.io"),)


@pytest.fixture
def server(scratch: Path) -> Iterator[Server]:
    with Server(load_config(root=scratch / "root", address=scratch / "s.sock")) as s:
        yield s


@pytest.fixture
def store(server: Server) -> Snapshotter:
    """The server's own store, for fast set-up and for checking what the wire says."""
    return server.snapshotters["stratasnap"]


@pytest.fixture
def stub(server: Server) -> Iterator[Any]:
    with grpc.insecure_channel(f"unix:{server.address}") as channel:
        yield snapshots_pb2_grpc.SnapshotsStub(channel)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.address, namespace="test", timeout=30) as c:
        yield c


def code_of(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    return err.code(), err.details() or ""


# -- each RPC on the wire -----------------------------------------------------------------


def test_prepare_commit_view_mounts_remove(stub: Any, store: Snapshotter) -> None:
    resp = stub.Prepare(
        pb.PrepareSnapshotRequest(snapshotter="stratasnap", key="a", labels={"l": "1"}),
        metadata=NS,
    )
    assert [(m.type, tuple(m.options)) for m in resp.mounts] == [("bind", ("rbind", "rw"))]
    assert Path(resp.mounts[0].source).is_dir()
    assert store.stat("a").labels == {"l": "1"}

    again = stub.Mounts(pb.MountsRequest(snapshotter="stratasnap", key="a"))
    assert again.mounts == resp.mounts

    stub.Commit(pb.CommitSnapshotRequest(snapshotter="stratasnap", name="base", key="a"))
    assert store.stat("base").kind is Kind.COMMITTED
    with pytest.raises(NotFound):
        store.stat("a")

    view = stub.View(pb.ViewSnapshotRequest(snapshotter="stratasnap", key="v", parent="base"))
    assert [(m.type, "ro" in m.options) for m in view.mounts] == [("bind", True)]
    assert store.stat("v").kind is Kind.VIEW and store.stat("v").parent == "base"

    stub.Remove(pb.RemoveSnapshotRequest(snapshotter="stratasnap", key="v"))
    stub.Remove(pb.RemoveSnapshotRequest(snapshotter="stratasnap", key="base"))
    assert list(store.walk()) == []


def test_stat_sends_kind_timestamps_labels(stub: Any, store: Snapshotter) -> None:
    store.prepare("p", labels={"a": "b"})
    store.commit("c", "p", labels={"x": "y"})
    store.prepare("act", "c")
    store.view("vw", "c")
    want = {"c": pb.COMMITTED, "act": pb.ACTIVE, "vw": pb.VIEW}
    for key, kind in want.items():
        info = stub.Stat(pb.StatSnapshotRequest(snapshotter="x", key=key)).info
        lib = store.stat(key)
        assert info.name == key
        assert info.kind == kind != pb.UNKNOWN
        assert info.parent == lib.parent
        assert dict(info.labels) == dict(lib.labels)
        # Full precision: the store's nanoseconds travel, nothing is lost.
        assert isinstance(lib.created, Timestamp)
        assert info.created_at.seconds == int(lib.created.timestamp())
        assert info.created_at.nanos == lib.created.nanosecond
        assert info.created_at.nanos // 1000 == lib.created.microsecond
        back = from_timestamp(info.created_at)
        assert isinstance(back, Timestamp) and back.epoch_ns == lib.created.epoch_ns
        assert from_timestamp(info.updated_at) == lib.updated
    assert stub.Stat(pb.StatSnapshotRequest(key="c")).info.labels["x"] == "y"


def test_timestamp_conversion_round_trips() -> None:
    for when in (
        datetime(2026, 11, 29, 13, 0, 0, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch
        datetime(1970, 1, 1, tzinfo=UTC),
    ):
        ts = to_timestamp(when)
        assert 0 <= ts.nanos < 10**9
        assert ts.nanos == when.microsecond * 1000
        assert from_timestamp(ts) == when
    naive = datetime(2020, 1, 1, 0, 0, 0, 5)
    assert from_timestamp(to_timestamp(naive)) == naive.replace(tzinfo=UTC)


def test_update_mask_becomes_fieldpaths(stub: Any, store: Snapshotter) -> None:
    store.prepare("u", labels={"l1": "1", "l2": "2", "l3": "3"})

    def update(labels: dict[str, str], *paths: str, mask: bool = True) -> dict[str, str]:
        req = pb.UpdateSnapshotRequest(
            snapshotter="stratasnap", info=pb.Info(name="u", labels=labels)
        )
        if mask:
            req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(paths)))
        info = stub.Update(req).info
        assert info.kind == pb.ACTIVE  # the full Info comes back
        return dict(info.labels)

    assert update({"l1": "new", "l4": "4"}, "labels.l1", "labels.l2") == {"l1": "new", "l3": "3"}
    assert update({"only": "this"}, "labels") == {"only": "this"}
    assert update({"no": "mask"}, mask=False) == {"no": "mask"}
    assert update({"empty": "mask"}) == {"empty": "mask"}
    assert dict(store.stat("u").labels) == {"empty": "mask"}

    # Name, parent and kind of the sent Info are ignored; other paths are refused.
    req = pb.UpdateSnapshotRequest(
        info=pb.Info(name="u", parent="nope", kind=pb.COMMITTED, labels={"k": "v"})
    )
    assert stub.Update(req).info.kind == pb.ACTIVE
    assert store.stat("u").parent == ""
    with pytest.raises(grpc.RpcError) as e:
        stub.Update(
            pb.UpdateSnapshotRequest(
                info=pb.Info(name="u"), update_mask=field_mask_pb2.FieldMask(paths=["parent"])
            )
        )
    assert code_of(e) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        'cannot update "parent" field on snapshot "u": invalid argument',
    )


def test_usage_size_is_field_1_inodes_field_2(stub: Any, store: Snapshotter) -> None:
    mounts = store.prepare("w")
    data = Path(mounts[0].source)
    (data / "f").write_bytes(b"x" * 8192)
    (data / "d").mkdir()
    lib = store.usage("w")
    resp = stub.Usage(pb.UsageRequest(snapshotter="stratasnap", key="w"))
    assert (resp.size, resp.inodes) == (lib.size, lib.inodes)
    assert resp.size >= 8192 and resp.inodes >= 3
    wire = resp.SerializeToString()
    # Field 1 varint (tag 0x08) carries the size, field 2 (tag 0x10) the inodes.
    assert wire == pb.UsageResponse(size=lib.size, inodes=lib.inodes).SerializeToString()
    assert wire[0] == 0x08 and 0x10 in wire[1:]
    decoded = pb.UsageResponse.FromString(bytes([0x08, 0x05, 0x10, 0x07]))
    assert (decoded.size, decoded.inodes) == (5, 7)


def test_commit_parent_rebases(stub: Any, store: Snapshotter) -> None:
    store.prepare("base-a")
    store.commit("base", "base-a")
    store.prepare("layer-a")  # unpacked without a parent (parallel unpack)
    request = pb.CommitSnapshotRequest(
        snapshotter="stratasnap", name="layer", key="layer-a", parent="base", labels={"a": "1"}
    )
    if "rebase" in getattr(store, "capabilities", ()):
        stub.Commit(request)
        info = store.stat("layer")
        assert (info.kind, info.parent, dict(info.labels)) == (Kind.COMMITTED, "base", {"a": "1"})
    else:
        # The parent (field 5) reached the backend, which cannot rebase: UNIMPLEMENTED.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Commit(request)
        assert code_of(refused)[0] is grpc.StatusCode.UNIMPLEMENTED
        assert 'onto "base"' in code_of(refused)[1]
        assert store.stat("layer-a").kind is Kind.ACTIVE
    # Rebasing onto something that is not a committed snapshot fails, and changes nothing.
    store.prepare("other-a")
    store.prepare("act")
    with pytest.raises(grpc.RpcError) as e:
        stub.Commit(pb.CommitSnapshotRequest(name="other", key="other-a", parent="act"))
    # containerd's metastore: a rebase onto a parent that is not committed is
    # FailedPrecondition (a parent that is not committed at Prepare is InvalidArgument).
    assert code_of(e)[0] is grpc.StatusCode.FAILED_PRECONDITION
    assert '"act" is not committed' in code_of(e)[1]
    assert store.stat("other-a").kind is Kind.ACTIVE


def test_cleanup(stub: Any, server: Server, store: Snapshotter, scratch: Path) -> None:
    leftover = scratch / "root" / "snapshots" / "new-424242"
    leftover.mkdir()
    (leftover / "f").write_bytes(b"y" * 20000)
    stub.Cleanup(pb.CleanupRequest(snapshotter="stratasnap"))
    assert not leftover.exists()
    got = server.metrics.registry.get_sample_value(
        "stratasnap_cleanup_reclaimed_bytes_total", {"snapshotter": "stratasnap"}
    )
    assert got is not None and got >= 20000


# -- List ---------------------------------------------------------------------------------


def test_list_thousands_in_batches_of_100(stub: Any, store: Snapshotter) -> None:
    store.prepare("root-a")
    store.commit("root", "root-a", labels={"tier": "base"})
    for i in range(2499):
        store.prepare(f"k8s.io/{i}/active {i}", "root", labels={"n": str(i), "odd": str(i % 2)})
    batches = [list(r.info) for r in stub.List(pb.ListSnapshotsRequest(snapshotter="x"))]
    assert [len(b) for b in batches] == [100] * 25
    infos = [i for b in batches for i in b]
    assert len({i.name for i in infos}) == 2500
    assert {i.kind for i in infos} == {pb.ACTIVE, pb.COMMITTED}

    def names(*filters: str) -> set[str]:
        req = pb.ListSnapshotsRequest(filters=list(filters))
        return {i.name for r in stub.List(req) for i in r.info}

    assert names("kind==committed") == {"root"}
    assert names("labels.tier==base") == {"root"}
    assert len(names("labels.odd==1")) == 1249
    assert names('labels.n==7,parent=="root"') == {"k8s.io/7/active 7"}
    # Several filters: any of them (OR).
    assert names("labels.n==1", "labels.n==2", "kind==committed") == {
        "k8s.io/1/active 1",
        "k8s.io/2/active 2",
        "root",
    }
    assert names("labels.n==nope") == set()


def test_list_of_nothing_sends_no_message(stub: Any) -> None:
    assert list(stub.List(pb.ListSnapshotsRequest())) == []


def test_list_bad_filter_is_invalid_argument(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as e:
        list(stub.List(pb.ListSnapshotsRequest(filters=["kind="])))
    code, message = code_of(e)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.endswith(": invalid argument")


def test_list_batches_of_big_infos_stay_small(client: Client, store: Snapshotter) -> None:
    # 100 snapshots x 11 labels x ~4000 bytes: 4.4 MB, over gRPC's 4 MiB default. A
    # client may store 1024 such labels per snapshot: 100 of those would be 400 MB,
    # far over any limit, so batches are cut by size as well as by count.
    big = {f"label-{j}": "v" * 3990 for j in range(11)}
    for i in range(100):
        store.prepare(f"big-{i}", labels=big)
    huge = {f"label-{j}": "v" * 4000 for j in range(1024)}
    store.prepare("huge", labels=huge)
    batches = list(client.list_batches())
    assert sum(len(b) for b in batches) == 101
    assert all(len(b) < 100 for b in batches)
    assert all(dict(i.labels) == big for b in batches for i in b if i.name != "huge")
    (alone,) = [b for b in batches if any(i.name == "huge" for i in b)]
    assert [dict(i.labels) for i in alone] == [huge]


# -- errors ---------------------------------------------------------------------------------


def test_contract_errors_keep_code_and_message(stub: Any, store: Snapshotter) -> None:
    store.prepare("a")
    store.commit("b", "a")
    store.view("v", "b")
    cases: list[tuple[Callable[[], object], grpc.StatusCode, str | None]] = [
        (
            lambda: stub.Stat(pb.StatSnapshotRequest(key="nope")),
            grpc.StatusCode.NOT_FOUND,
            'snapshot "nope": not found',
        ),
        (
            lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="b")),
            grpc.StatusCode.ALREADY_EXISTS,
            'snapshot "b": already exists',
        ),
        (
            lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="c", parent="v")),
            grpc.StatusCode.INVALID_ARGUMENT,
            'parent "v" is not committed snapshot: invalid argument',
        ),
        (
            lambda: stub.Mounts(pb.MountsRequest(key="b")),
            grpc.StatusCode.FAILED_PRECONDITION,
            None,
        ),
        (
            lambda: stub.Remove(pb.RemoveSnapshotRequest(key="b")),
            grpc.StatusCode.FAILED_PRECONDITION,
            None,
        ),
        (
            lambda: stub.Commit(pb.CommitSnapshotRequest(name="z", key="v")),
            grpc.StatusCode.FAILED_PRECONDITION,
            None,
        ),
        (
            lambda: stub.Usage(pb.UsageRequest(key="nope")),
            grpc.StatusCode.NOT_FOUND,
            None,
        ),
        (
            lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="")),
            grpc.StatusCode.INVALID_ARGUMENT,
            None,
        ),
    ]
    for call, code, message in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        got_code, got_message = code_of(e)
        assert got_code == code, got_message
        if message is not None:
            assert got_message == message
        # containerd's errgrpc.ToNative strips exactly this suffix to get the class back.
        suffix = {
            grpc.StatusCode.NOT_FOUND: ": not found",
            grpc.StatusCode.ALREADY_EXISTS: ": already exists",
            grpc.StatusCode.INVALID_ARGUMENT: ": invalid argument",
            grpc.StatusCode.FAILED_PRECONDITION: ": failed precondition",
        }[code]
        assert got_message.endswith(suffix)


class Faulty:
    """A snapshotter whose every call raises ``error`` (for the codes native never gives)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        def fail(*args: object, **kwargs: object) -> Any:
            raise self.error

        return fail

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (ResourceExhausted("copying snapshot: No space left"), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "copying snapshot: No space left: resource exhausted"),
        (Unimplemented("snapshotter does not implement Cleanup method"),
         grpc.StatusCode.UNIMPLEMENTED,
         "snapshotter does not implement Cleanup method: not implemented"),
        (Unavailable("store closed"), grpc.StatusCode.UNAVAILABLE, "store closed: unavailable"),
        (SnapshotError("odd"), grpc.StatusCode.UNKNOWN, "odd: unknown"),
        (AlreadyExists('snapshot "x"'), grpc.StatusCode.ALREADY_EXISTS,
         'snapshot "x": already exists'),
        (FailedPrecondition("busy"), grpc.StatusCode.FAILED_PRECONDITION,
         "busy: failed precondition"),
        (InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT, "bad: invalid argument"),
        (NotFound("gone"), grpc.StatusCode.NOT_FOUND, "gone: not found"),
        (RuntimeError("boom"), grpc.StatusCode.UNKNOWN, "RuntimeError: boom"),
        (KeyError("k"), grpc.StatusCode.UNKNOWN, "KeyError: 'k'"),
    ],
)  # fmt: skip
def test_every_error_class_maps_to_its_code(
    scratch: Path,
    caplog: pytest.LogCaptureFixture,
    error: BaseException,
    code: grpc.StatusCode,
    message: str,
) -> None:
    faulty = Faulty(error)
    config = load_config(root=scratch / "root", address=scratch / "s.sock")
    with (
        Server(config, opener=lambda sc: cast(Snapshotter, faulty)) as server,
        grpc.insecure_channel(f"unix:{server.address}") as channel,
    ):
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        calls: list[Callable[[], object]] = [
            lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="k")),
            lambda: stub.View(pb.ViewSnapshotRequest(key="k", parent="p")),
            lambda: stub.Mounts(pb.MountsRequest(key="k")),
            lambda: stub.Commit(pb.CommitSnapshotRequest(name="n", key="k")),
            lambda: stub.Remove(pb.RemoveSnapshotRequest(key="k")),
            lambda: stub.Stat(pb.StatSnapshotRequest(key="k")),
            lambda: stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="k"))),
            lambda: list(stub.List(pb.ListSnapshotsRequest())),
            lambda: stub.Usage(pb.UsageRequest(key="k")),
            lambda: stub.Cleanup(pb.CleanupRequest()),
        ]
        with caplog.at_level(logging.ERROR, "stratasnap"):
            for call in calls:
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert code_of(e) == (code, message)
        with Client(server.address) as client, pytest.raises(SnapshotError) as typed:
            client.stat("k")
        assert str(typed.value) == message
        assert typed.value.grpc_code == code.value[0]
        if isinstance(error, SnapshotError):
            assert type(typed.value) is type(error)
    assert faulty.closed
    crashes = [r for r in caplog.records if r.getMessage() == "rpc crashed"]
    if isinstance(error, SnapshotError):
        assert crashes == []  # errors of the contract are not crashes
    else:
        assert len(crashes) == 11  # anything else: logged with its traceback (10 + client)
        assert all(r.exc_info and r.exc_info[1] is error for r in crashes)
        assert {r.method for r in crashes} == {  # type: ignore[attr-defined]
            "Prepare", "View", "Mounts", "Commit", "Remove",
            "Stat", "Update", "List", "Usage", "Cleanup",
        }  # fmt: skip


def test_client_error_classes_round_trip(client: Client, store: Snapshotter) -> None:
    store.prepare("a")
    with pytest.raises(NotFound) as nf:
        client.stat("zz")
    assert str(nf.value) == 'snapshot "zz": not found' and nf.value.context == 'snapshot "zz"'
    with pytest.raises(AlreadyExists):
        client.prepare("a")
    client.commit("a2", "a")
    with pytest.raises(FailedPrecondition):
        client.mounts("a2")
    with pytest.raises(InvalidArgument):
        client.walk("kind=")


# -- which snapshotter, namespace -----------------------------------------------------------


def test_single_snapshotter_answers_every_name(stub: Any, store: Snapshotter) -> None:
    store.prepare("k")
    for name in ("stratasnap", "", "anything", "overlayfs"):
        assert stub.Stat(pb.StatSnapshotRequest(snapshotter=name, key="k")).info.name == "k"


def test_named_snapshotters_on_one_socket(scratch: Path) -> None:
    config = Config(
        root=scratch,
        address=scratch / "s.sock",
        snapshotters=(
            SnapshotterConfig("fast", "native", scratch / "fast"),
            SnapshotterConfig("slow", "native", scratch / "slow"),
        ),
    )
    with Server(config) as server:
        with Client(server.address, snapshotter="fast") as fast:
            fast.prepare("only-in-fast")
        with Client(server.address, snapshotter="slow") as slow:
            slow.prepare("only-in-slow")
            with pytest.raises(NotFound):
                slow.stat("only-in-fast")
        assert [i.name for i in server.snapshotters["fast"].walk()] == ["only-in-fast"]
        assert [i.name for i in server.snapshotters["slow"].walk()] == ["only-in-slow"]
        with Client(server.address, snapshotter="") as default:
            assert default.stat("only-in-fast").name == "only-in-fast"  # empty: the first
        with Client(server.address, snapshotter="zfs") as unknown:
            with pytest.raises(NotFound) as e:
                unknown.stat("x")
            assert "'zfs'" in str(e.value) and str(e.value).endswith(": not found")
            with pytest.raises(NotFound):
                list(unknown.walk())


def test_namespace_and_call_show_in_logs(
    stub: Any, store: Snapshotter, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, "stratasnap.server"):
        stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="s1", key="k"), metadata=NS)
        with pytest.raises(grpc.RpcError):
            stub.Stat(pb.StatSnapshotRequest(key="missing"), metadata=NS)
    ok = next(r for r in caplog.records if getattr(r, "method", "") == "Prepare")
    assert (ok.namespace, ok.key, ok.snapshotter) == ("k8s.io", "k", "s1")  # type: ignore[attr-defined]
    assert ok.duration_ms >= 0  # type: ignore[attr-defined]
    failed = next(r for r in caplog.records if getattr(r, "method", "") == "Stat")
    assert failed.code == "NOT_FOUND"  # type: ignore[attr-defined]
    assert failed.namespace == "k8s.io"  # type: ignore[attr-defined]


def test_typed_client_walk_and_info(client: Client, store: Snapshotter) -> None:
    client.prepare("a", labels={"x": "1"})
    client.commit("b", "a", labels={"y": "2"})
    got = client.stat("b")
    assert got == store.stat("b")
    assert list(client.walk()) == list(store.walk())
    updated = client.update(Info("b", Kind.COMMITTED, labels={"z": "3"}), ["labels.z"])
    assert dict(updated.labels) == {"y": "2", "z": "3"}
    assert client.usage("b") == store.usage("b")
    assert client.cleanup() == Reclaimed()
    client.remove("b")
    assert list(client.walk()) == []
