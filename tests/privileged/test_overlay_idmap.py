"""ID-mapped snapshots: mapping labels become uidmap=/gidmap= options and idmapped layers."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_root

from stratasnap import open_snapshotter
from stratasnap.backends.overlay import OverlaySnapshotter
from stratasnap.backends.overlay_idmap import GIDMAP_LABEL, UIDMAP_LABEL
from stratasnap.errors import InvalidArgument, NotFound
from stratasnap.fs import helper_process, idmapped
from stratasnap.fs.idmapped import apply_idmapped_mounts, user_namespace
from stratasnap.fs.mount import unmount_all_under

pytestmark = pytest.mark.privileged

MAPPED = {UIDMAP_LABEL: "0:100000:65536", GIDMAP_LABEL: "0:200000:65536"}


@pytest.fixture
def sn(scratch: Path) -> Iterator[OverlaySnapshotter]:
    need_root()
    s = open_snapshotter(scratch / "root", "overlay")
    assert isinstance(s, OverlaySnapshotter)
    try:
        yield s
    finally:
        s.close()


def _fs(sn: OverlaySnapshotter, key: str) -> Path:
    with sn._store.read() as tx:
        return sn.storage_dir(tx.get(key).id) / "fs"


def _base(sn: OverlaySnapshotter) -> None:
    sn.prepare("base-a")
    up = _fs(sn, "base-a")
    (up / "rootfile").write_text("r")
    (up / "userfile").write_text("u")
    os.chown(up / "userfile", 1000, 1000)
    sn.commit("base", "base-a")


def test_options_and_upper_owner(sn: OverlaySnapshotter) -> None:
    _base(sn)
    [m] = sn.prepare("c", "base", labels=MAPPED)
    assert m.options[:2] == ("uidmap=0:100000:65536", "gidmap=0:200000:65536")
    st = os.stat(_fs(sn, "c"))
    assert (st.st_uid, st.st_gid) == (100000, 200000)  # the container's root
    [b] = sn.prepare("lone", labels=MAPPED)
    assert b.type == "bind" and b.options[:2] == m.options[:2]
    assert "remap-ids" in type(sn).capabilities


def test_overlay_with_idmapped_lowers(sn: OverlaySnapshotter, scratch: Path) -> None:
    _base(sn)
    target = scratch / "mnt"
    target.mkdir()
    apply_idmapped_mounts(sn.prepare("c", "base", labels=MAPPED), target)
    try:
        root, user = os.stat(target / "rootfile"), os.stat(target / "userfile")
        assert (root.st_uid, root.st_gid) == (100000, 200000)
        assert (user.st_uid, user.st_gid) == (101000, 201000)
        st = os.stat(target)
        assert (st.st_uid, st.st_gid) == (100000, 200000)
        (target / "new").write_text("n")
    finally:
        unmount_all_under(target)
    # The layer on disk is untouched: no chown happened.
    assert os.stat(_fs(sn, "base") / "userfile").st_uid == 1000
    assert (_fs(sn, "c") / "new").read_text() == "n"
    assert [p.name for p in scratch.iterdir() if p.name.startswith(".idmap-")] == []


def test_idmapped_bind_of_a_single_layer_view(sn: OverlaySnapshotter, scratch: Path) -> None:
    _base(sn)
    target = scratch / "mnt"
    target.mkdir()
    apply_idmapped_mounts(sn.view("v", "base", labels=MAPPED), target)
    try:
        assert os.stat(target / "userfile").st_uid == 101000
        with pytest.raises(OSError):
            (target / "x").write_text("x")  # still read-only
    finally:
        unmount_all_under(target)


@pytest.mark.parametrize(
    "labels",
    [
        {UIDMAP_LABEL: "0:100000:65536"},  # gid mapping missing
        {UIDMAP_LABEL: "0:100000", GIDMAP_LABEL: "0:200000:65536"},
        {UIDMAP_LABEL: "1:100000:10", GIDMAP_LABEL: "0:200000:65536"},  # no root
        {UIDMAP_LABEL: "0:1:10,5:100:10", GIDMAP_LABEL: "0:2:10"},  # overlap
        {UIDMAP_LABEL: "0:4294967295:2", GIDMAP_LABEL: "0:2:10"},  # past 32 bits
        {UIDMAP_LABEL: "a:b:c", GIDMAP_LABEL: "0:2:10"},
    ],
)
def test_malformed_mappings_create_nothing(sn: OverlaySnapshotter, labels: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument, match=r"label containerd\.io/snapshot/"):
        sn.prepare("x", labels=labels)
    with pytest.raises(NotFound):
        sn.stat("x")
    assert os.listdir(sn.snapshots_dir) == []


def _user_ns_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_user_namespace_while_grpc_runs_in_the_process(scratch: Path) -> None:
    """A fork of a process running gRPC comes up with gRPC's threads again, and
    unshare(CLONE_NEWUSER) refuses a threaded process (EINVAL): the namespace
    must come from a child that is single-threaded whatever the parent runs."""
    need_root()
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    address = f"unix:{scratch / 'grpc.sock'}"
    server.add_insecure_port(address)
    server.start()
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        with user_namespace("0:100000:65536", "0:200000:65536") as fd:
            assert _user_ns_of(fd).startswith("user:[")
            assert _user_ns_of(fd) != os.readlink("/proc/self/ns/user")
    finally:
        channel.close()
        server.stop(None)


def test_user_namespace_failure_carries_the_childs_errno(monkeypatch: pytest.MonkeyPatch) -> None:
    # An exit-signal bit is not a namespace flag: the child's unshare fails with EINVAL.
    need_root()
    monkeypatch.setattr(idmapped, "CLONE_NEWUSER", idmapped.CLONE_NEWUSER | 0x11)
    with pytest.raises(OSError) as err, user_namespace("0:100000:1", "0:100000:1"):
        pass
    assert err.value.errno == errno.EINVAL
    assert "unshare(CLONE_NEWUSER)" in str(err.value)


def test_a_hung_helper_fails_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    need_root()
    monkeypatch.setattr(idmapped, "_UNSHARE_SCRIPT", "import time\ntime.sleep(60)\n")
    monkeypatch.setattr(helper_process, "HELPER_TIMEOUT_S", 0.5)
    started = time.monotonic()
    with pytest.raises(OSError) as err, user_namespace("0:100000:1", "0:100000:1"):
        pass
    assert err.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - started < 10
