"""Hostile input through the real socket: the server stays up, answers every request
with a proper code within a deadline, and a rejected request changes nothing on disk.

Property tests (hypothesis) over keys, labels, filters, field masks and random
protobuf bytes for every method. "Proper" means the code a caller can act on:
never UNKNOWN (a crash inside the server), never DEADLINE_EXCEEDED (a hang);
INTERNAL only for bytes that are no request at all (gRPC's own answer, as Go's).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import need
from google.protobuf import field_mask_pb2
from google.protobuf.message import DecodeError

from stratasnap.server.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from stratasnap.server.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from stratasnap.server.config import load_config
from stratasnap.server.daemon import Server
from stratasnap.server.service import SERVICE
from stratasnap.snapshotter import Snapshotter

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: Generous on a shared 2-CPU machine; a hang is minutes, not seconds.
DEADLINE = 10.0
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NEVER = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
}

METHODS: list[tuple[str, Any, bool]] = [
    ("Prepare", pb.PrepareSnapshotRequest, False),
    ("View", pb.ViewSnapshotRequest, False),
    ("Mounts", pb.MountsRequest, False),
    ("Commit", pb.CommitSnapshotRequest, False),
    ("Remove", pb.RemoveSnapshotRequest, False),
    ("Stat", pb.StatSnapshotRequest, False),
    ("Update", pb.UpdateSnapshotRequest, False),
    ("List", pb.ListSnapshotsRequest, True),
    ("Usage", pb.UsageRequest, False),
    ("Cleanup", pb.CleanupRequest, False),
]


@pytest.fixture(scope="module", params=["native", "overlay", "blockfile"])
def server(_scratch_base: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    backend = request.param
    if backend == "blockfile":
        need(shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin") is not None, "no mkfs.ext4")
    work = Path(tempfile.mkdtemp(prefix="bad-input-", dir=_scratch_base))
    options = {"scratch_size": "64M"} if backend == "blockfile" else None
    config = load_config(
        root=work / "root", address=work / "s.sock", backend=backend, options=options
    )
    with Server(config) as s:
        sn = s.snapshotters["stratasnap"]
        sn.prepare("layer", labels={"keep": "me"})
        sn.commit("base", "layer")
        sn.prepare("active", "base", labels={"a": "1"})
        sn.view("view", "base")
        yield s


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix:{server.address}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> Any:
    return snapshots_pb2_grpc.SnapshotsStub(channel)


def store_of(server: Server) -> Snapshotter:
    return server.snapshotters["stratasnap"]


def disk_state(server: Server) -> tuple[object, ...]:
    """What a rejected request must leave exactly as it was."""
    sn = store_of(server)
    root = Path(getattr(sn, "root"))  # noqa: B009 (Snapshotter has no root in the protocol)
    entries = tuple(sorted(os.listdir(root / "snapshots")))
    rows = tuple(
        (i.name, i.kind, i.parent, tuple(sorted(i.labels.items())), i.created, i.updated)
        for i in sn.walk()
    )
    return entries, rows


def call(stub: Any, method: str, request: Any) -> grpc.StatusCode:
    """The call's status code (streams are read to the end)."""
    try:
        result = getattr(stub, method)(request, timeout=DEADLINE)
        if method == "List":
            for _ in result:
                pass
    except grpc.RpcError as e:
        code: grpc.StatusCode = e.code()
        if code in NEVER:
            print(method, code, e.details())  # shown with the failing example
        return code
    return grpc.StatusCode.OK


def proper(server: Server, stub: Any, method: str, request: Any) -> grpc.StatusCode:
    """Send ``request``: a proper code, the server still up, nothing changed if rejected."""
    before = disk_state(server)
    code = call(stub, method, request)
    assert code not in NEVER, (method, request, code)
    if code is not grpc.StatusCode.OK:
        assert disk_state(server) == before, (method, request, code)
    assert call(stub, "Stat", pb.StatSnapshotRequest(key="base")) is grpc.StatusCode.OK
    return code


# -- strategies ----------------------------------------------------------------------------

# Text that protobuf can carry (valid UTF-8): everything but lone surrogates.
_any = st.characters(exclude_categories=["Cs"])
_syntax = st.sampled_from(list('.,=!~"/|\\ \t\n(){}[]*+?^$\x00'))
texts = st.one_of(
    st.text(_any, max_size=40),
    st.text(st.one_of(_any, _syntax), max_size=40),
    st.sampled_from(["", "base", "active", "view", "layer", "x" * 5000, "\x00", "a/../b"]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\U0001f600"]), st.integers(0, 6000)),
)
labels = st.dictionaries(texts, texts, max_size=5) | st.just(
    {f"l{i}": "v" for i in range(1100)}  # more labels than a snapshot may have
)
filters_ = st.lists(
    st.one_of(
        texts,
        st.builds(
            lambda f, op, v: f"{f}{op}{v}",
            st.sampled_from(["name", "kind", "parent", "labels.a", 'labels."x.y"', "z"]),
            st.sampled_from(["==", "!=", "~=", ""]),
            texts,
        ),
        st.sampled_from(
            [
                "name~=(a+)+$",
                "name~=" + "(" * 1001 + ")" * 1001,
                "name~=a{1001}",
                "name~=/" + r"\pL{1000}" * 200 + "/",
                ",".join(["kind"] * 5000),
            ]
        ),
    ),
    max_size=6,
)


# -- the properties ------------------------------------------------------------------------


@SETTINGS
@given(method=st.sampled_from(["Prepare", "View"]), key=texts, parent=texts, lab=labels)
def test_create_with_hostile_keys_and_labels(
    server: Server, stub: Any, method: str, key: str, parent: str, lab: dict[str, str]
) -> None:
    req_type = pb.PrepareSnapshotRequest if method == "Prepare" else pb.ViewSnapshotRequest
    proper(server, stub, method, req_type(key=key, parent=parent, labels=lab))


@SETTINGS
@given(
    method=st.sampled_from(["Mounts", "Remove", "Stat", "Usage"]),
    key=texts,
)
def test_key_calls_with_hostile_keys(server: Server, stub: Any, method: str, key: str) -> None:
    if method == "Remove" and key in ("base", "active", "view"):
        return  # the fixture's snapshots stay
    req = {
        "Mounts": pb.MountsRequest,
        "Remove": pb.RemoveSnapshotRequest,
        "Stat": pb.StatSnapshotRequest,
        "Usage": pb.UsageRequest,
    }[method](key=key)
    proper(server, stub, method, req)


@SETTINGS
@given(name=texts, key=texts, parent=texts, lab=labels)
def test_commit_with_hostile_input(
    server: Server, stub: Any, name: str, key: str, parent: str, lab: dict[str, str]
) -> None:
    proper(
        server,
        stub,
        "Commit",
        pb.CommitSnapshotRequest(name=name, key=key, parent=parent, labels=lab),
    )


@SETTINGS
@given(filters=filters_)
def test_list_with_hostile_filters(server: Server, stub: Any, filters: list[str]) -> None:
    code = proper(server, stub, "List", pb.ListSnapshotsRequest(filters=filters))
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)


@SETTINGS
@given(
    key=st.sampled_from(["active", "base", "view", "nope"]) | texts,
    paths=st.lists(
        st.one_of(texts, st.builds(lambda t: f"labels.{t}", texts), st.just("labels")),
        max_size=5,
    )
    | st.none(),
    lab=labels,
)
def test_update_with_hostile_field_masks(
    server: Server, stub: Any, key: str, paths: list[str] | None, lab: dict[str, str]
) -> None:
    req = pb.UpdateSnapshotRequest(info=pb.Info(name=key, labels=lab))
    if paths is not None:
        req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    code = proper(server, stub, "Update", req)
    if code is grpc.StatusCode.OK:
        assert store_of(server).stat(key).name == key  # the update went to that snapshot


@SETTINGS
@given(index=st.integers(0, len(METHODS) - 1), data=st.binary(max_size=300))
def test_random_protobuf_bytes_for_every_method(
    server: Server, channel: grpc.Channel, index: int, data: bytes
) -> None:
    method, req_type, streaming = METHODS[index]
    if method == "Remove":
        return  # random bytes that decode to a fixture key would remove it; keys are above
    try:
        req_type.FromString(data)
        decodes = True
    except DecodeError:
        decodes = False
    path = f"/{SERVICE}/{method}"
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    make = channel.unary_stream if streaming else channel.unary_unary
    rpc = make(path, request_serializer=identity, response_deserializer=identity)
    before = disk_state(server)
    code = grpc.StatusCode.OK
    try:
        result = rpc(data, timeout=DEADLINE)
        if streaming:
            for _ in result:
                pass
    except grpc.RpcError as e:
        code = e.code()
    if decodes:
        assert code not in NEVER, (method, data, code)
    else:
        # gRPC's own answer to bytes that are no request (Go's server says the same).
        assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.OK), (method, data, code)
    if code is not grpc.StatusCode.OK:
        assert disk_state(server) == before
    assert store_of(server).stat("base").name == "base"
