"""The committed gRPC modules are fresh, and the wire matches containerd's snapshots v1."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

from conftest import need

from stratasnap.server.api.containerd.services.snapshots.v1 import snapshots_pb2
from stratasnap.server.api.containerd.types import mount_pb2

fd_pkg = "containerd.services.snapshots.v1"


def _files(root: Path) -> set[Path]:
    return {
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_modules_are_fresh(scratch: Path) -> None:
    need(
        importlib.util.find_spec("grpc_tools") is not None,
        "grpcio-tools (the dev extra, installed by make test) is not installed",
    )
    from stratasnap.server import protogen

    out = scratch / "api"
    protogen.generate(out)
    fresh, committed = _files(out), _files(protogen.API_DIR)
    assert fresh == committed, "run scripts/gen-protos: the set of generated files changed"
    stale = [str(p) for p in sorted(fresh) if not filecmp.cmp(out / p, protogen.API_DIR / p, False)]
    assert not stale, f"run scripts/gen-protos: stale generated modules {stale}"


# {message: {field number: field name}} from containerd's api/services/snapshots/v1.
WIRE = {
    "PrepareSnapshotRequest": {1: "snapshotter", 2: "key", 3: "parent", 4: "labels"},
    "PrepareSnapshotResponse": {1: "mounts"},
    "ViewSnapshotRequest": {1: "snapshotter", 2: "key", 3: "parent", 4: "labels"},
    "ViewSnapshotResponse": {1: "mounts"},
    "MountsRequest": {1: "snapshotter", 2: "key"},
    "MountsResponse": {1: "mounts"},
    "RemoveSnapshotRequest": {1: "snapshotter", 2: "key"},
    "CommitSnapshotRequest": {1: "snapshotter", 2: "name", 3: "key", 4: "labels", 5: "parent"},
    "StatSnapshotRequest": {1: "snapshotter", 2: "key"},
    "Info": {
        1: "name",
        2: "parent",
        3: "kind",
        4: "created_at",
        5: "updated_at",
        6: "labels",
    },
    "StatSnapshotResponse": {1: "info"},
    "UpdateSnapshotRequest": {1: "snapshotter", 2: "info", 3: "update_mask"},
    "UpdateSnapshotResponse": {1: "info"},
    "ListSnapshotsRequest": {1: "snapshotter", 2: "filters"},
    "ListSnapshotsResponse": {1: "info"},
    "UsageRequest": {1: "snapshotter", 2: "key"},
    "UsageResponse": {1: "size", 2: "inodes"},
    "CleanupRequest": {1: "snapshotter"},
}


def test_messages_match_containerd() -> None:
    fd = snapshots_pb2.DESCRIPTOR
    assert fd.package == "containerd.services.snapshots.v1"
    assert set(fd.message_types_by_name) == set(WIRE)
    for name, fields in WIRE.items():
        msg = fd.message_types_by_name[name]
        assert {f.number: f.name for f in msg.fields} == fields, name
    info = fd.message_types_by_name["Info"].fields_by_name
    assert _name(info["created_at"].message_type) == "google.protobuf.Timestamp"
    assert _name(info["kind"].enum_type) == "containerd.services.snapshots.v1.Kind"
    usage = fd.message_types_by_name["UsageResponse"].fields_by_name
    assert usage["size"].type == usage["size"].TYPE_INT64
    assert usage["inodes"].type == usage["inodes"].TYPE_INT64
    mask = fd.message_types_by_name["UpdateSnapshotRequest"].fields_by_name["update_mask"]
    assert _name(mask.message_type) == "google.protobuf.FieldMask"
    mounts = fd.message_types_by_name["PrepareSnapshotResponse"].fields_by_name["mounts"]
    assert _name(mounts.message_type) == "containerd.types.Mount"


def test_kind_enum_values() -> None:
    assert dict(snapshots_pb2.Kind.items()) == {
        "UNKNOWN": 0,
        "VIEW": 1,
        "ACTIVE": 2,
        "COMMITTED": 3,
    }


def test_mount_message() -> None:
    assert mount_pb2.DESCRIPTOR.package == "containerd.types"
    fields = mount_pb2.Mount.DESCRIPTOR.fields
    assert {f.number: f.name for f in fields} == {1: "type", 2: "source", 3: "target", 4: "options"}
    # A known encoding: type="bind" (field 1), options=["ro"] (field 4).
    assert mount_pb2.Mount(type="bind", options=["ro"]).SerializeToString() == b'\n\x04bind"\x02ro'


def test_service_methods() -> None:
    svc = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    methods = {m.name: (m.input_type.name, m.output_type.full_name) for m in svc.methods}
    assert methods == {
        "Prepare": ("PrepareSnapshotRequest", f"{fd_pkg}.PrepareSnapshotResponse"),
        "View": ("ViewSnapshotRequest", f"{fd_pkg}.ViewSnapshotResponse"),
        "Mounts": ("MountsRequest", f"{fd_pkg}.MountsResponse"),
        "Commit": ("CommitSnapshotRequest", "google.protobuf.Empty"),
        "Remove": ("RemoveSnapshotRequest", "google.protobuf.Empty"),
        "Stat": ("StatSnapshotRequest", f"{fd_pkg}.StatSnapshotResponse"),
        "Update": ("UpdateSnapshotRequest", f"{fd_pkg}.UpdateSnapshotResponse"),
        "List": ("ListSnapshotsRequest", f"{fd_pkg}.ListSnapshotsResponse"),
        "Usage": ("UsageRequest", f"{fd_pkg}.UsageResponse"),
        "Cleanup": ("CleanupRequest", "google.protobuf.Empty"),
    }
    streaming = {m.name for m in svc.methods if m.server_streaming or m.client_streaming}
    assert streaming == {"List"}
    assert not svc.methods_by_name["List"].client_streaming


# {message: {field number: field name}} from containerd's api/services/content/v1:
# the subset stratasnap's fast path calls (Info, Read, Status, ListStatuses).
CONTENT_WIRE = {
    "Info": {1: "digest", 2: "size", 3: "created_at", 4: "updated_at", 5: "labels"},
    "InfoRequest": {1: "digest"},
    "InfoResponse": {1: "info"},
    "ReadContentRequest": {1: "digest", 2: "offset", 3: "size"},
    "ReadContentResponse": {1: "offset", 2: "data"},
    "Status": {1: "started_at", 2: "updated_at", 3: "ref", 4: "offset", 5: "total", 6: "expected"},
    "StatusRequest": {1: "ref"},
    "StatusResponse": {1: "status"},
    "ListStatusesRequest": {1: "filters"},
    "ListStatusesResponse": {1: "statuses"},
}


def test_content_messages_match_containerd() -> None:
    from stratasnap.server.api.containerd.services.content.v1 import content_pb2

    fd = content_pb2.DESCRIPTOR
    assert fd.package == "containerd.services.content.v1"
    assert set(fd.message_types_by_name) == set(CONTENT_WIRE)
    for name, fields in CONTENT_WIRE.items():
        msg = fd.message_types_by_name[name]
        assert {f.number: f.name for f in msg.fields} == fields, name
    info = fd.message_types_by_name["Info"].fields_by_name
    assert info["size"].type == info["size"].TYPE_INT64
    assert _name(info["created_at"].message_type) == "google.protobuf.Timestamp"
    read = fd.message_types_by_name["ReadContentRequest"].fields_by_name
    assert read["offset"].type == read["size"].type == read["offset"].TYPE_INT64
    data = fd.message_types_by_name["ReadContentResponse"].fields_by_name["data"]
    assert data.type == data.TYPE_BYTES
    svc = fd.services_by_name["Content"]
    assert svc.full_name == "containerd.services.content.v1.Content"
    pkg = "containerd.services.content.v1"
    methods = {m.name: (m.input_type.name, m.output_type.full_name) for m in svc.methods}
    assert methods == {
        "Info": ("InfoRequest", f"{pkg}.InfoResponse"),
        "Read": ("ReadContentRequest", f"{pkg}.ReadContentResponse"),
        "Status": ("StatusRequest", f"{pkg}.StatusResponse"),
        "ListStatuses": ("ListStatusesRequest", f"{pkg}.ListStatusesResponse"),
    }
    assert {m.name for m in svc.methods if m.server_streaming or m.client_streaming} == {"Read"}
    # A known encoding: digest="sha256:ab" (field 1), offset=5 (field 2).
    wire = content_pb2.ReadContentRequest(digest="sha256:ab", offset=5).SerializeToString()
    assert wire == b"\n\tsha256:ab\x10\x05"


def _name(descriptor: object) -> str | None:
    """A field's message or enum type name (None for a scalar field)."""
    return getattr(descriptor, "full_name", None)
