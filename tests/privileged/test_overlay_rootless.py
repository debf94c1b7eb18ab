"""Rootless: the overlay backend inside a user namespace (``unshare -Urm``).

There ``trusted.*`` xattrs cannot be set, so the backend adds ``userxattr``
and overlayfs keeps its whiteout and opaque marks in ``user.overlay.*``.
The snapshotter runs in a child process in its own user and mount
namespaces; the root is on tmpfs, which has user xattrs since Linux 6.6
(before that, on an ext4 loop filesystem).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import need, need_root, user_xattrs_work

pytestmark = pytest.mark.privileged

CHILD = textwrap.dedent(
    """
    import json, os, shutil, sys
    from pathlib import Path
    from stratasnap import open_snapshotter
    from stratasnap.fs.mount import apply_mounts, unmount_all_under
    from stratasnap.fs.overlay_probe import in_user_namespace

    base = Path(sys.argv[1])
    out = {"userns": in_user_namespace()}
    sn = open_snapshotter(base / "root", "overlay")
    mnt = base / "mnt"
    mnt.mkdir()

    def layer(name, parent, change):
        apply_mounts(sn.prepare(name + "-a", parent), mnt)
        try:
            change(mnt)
        finally:
            unmount_all_under(mnt)
        sn.commit(name, name + "-a")

    def l1(r):
        (r / "gone").write_text("x")
        (r / "d").mkdir()
        (r / "d" / "old").write_text("old")
        (r / "keep").write_text("keep")

    def l2(r):
        (r / "gone").unlink()
        shutil.rmtree(r / "d")
        (r / "d").mkdir()
        (r / "d" / "new").write_text("new")

    layer("l1", "", l1)
    layer("l2", "l1", l2)
    [m] = sn.prepare("top", "l2")
    out["options"] = list(m.options)
    apply_mounts([m], mnt)
    try:
        out["tree"] = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
    finally:
        unmount_all_under(mnt)
    with sn._store.read() as tx:
        up = sn.storage_dir(tx.get("l2").id) / "fs"
    out["opaque"] = os.getxattr(up / "d", "user.overlay.opaque").decode()
    st = os.lstat(up / "gone")
    out["whiteout"] = [oct(st.st_mode >> 12), st.st_rdev]
    sn.close()
    print(json.dumps(out))
    """
)


def test_overlay_with_userxattr_in_a_user_namespace(
    scratch: Path, loopfs: Callable[..., Path]
) -> None:
    need_root()
    base = scratch if user_xattrs_work(scratch) else loopfs("ext4", size="256M")
    need(shutil.which("unshare") is not None, "unshare (util-linux) not installed")
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    need(probe.returncode == 0, f"user namespaces not allowed here: {probe.stderr!r}")
    done = subprocess.run(
        ["unshare", "-Urm", sys.executable, "-c", CHILD, str(base)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["userns"] is True
    assert "userxattr" in out["options"]
    assert out["tree"] == ["d", "d/new", "keep"]
    assert out["opaque"] == "y"
    assert out["whiteout"] == [oct(0o020000 >> 12), 0]  # a 0/0 character device
