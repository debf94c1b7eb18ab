"""Whiteouts written straight into an overlay upper (the form overlayfs reads), in both
xattr namespaces: ``trusted.`` and ``user.`` (overlay's ``userxattr``)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import need_root
from e2e.oci import Layer

from stratasnap.images.apply import Target, apply_tar
from stratasnap.images.unpack import landing
from stratasnap.types import Mount


def test_landing_reads_the_mounts() -> None:
    opts = ("index=off", "userxattr", "workdir=/w", "upperdir=/s/2/fs")
    m = Mount("overlay", "overlay", (*opts, "lowerdir=/s/1/fs:/s/a\\:b/fs"))
    with landing([m]) as t:
        assert t == Target("/s/2/fs", True, ("/s/1/fs", "/s/a:b/fs"), "user.")
    with landing([Mount("bind", "/s/1/fs", ("rw", "rbind"))]) as t:
        assert t == Target("/s/1/fs")


@pytest.mark.parametrize("prefix", ["trusted.", "user."])
def test_overlay_upper_whiteouts(prefix: str, scratch: Path) -> None:
    need_root()
    lower, upper, work, merged = (scratch / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "gone").write_text("x")
    (lower / "opq").mkdir()
    (lower / "opq" / "old").write_text("old")
    (lower / "kept").mkdir()
    (lower / "kept" / "k").write_text("k")
    (lower / "target").write_text("t")
    layer = (
        Layer().whiteout("gone").opaque("opq").file("opq/new", "new")
        .file("kept/added", "a").hardlink("link-to-lower", "target")
    )  # fmt: skip
    apply_tar(io.BytesIO(layer.tar()), Target(str(upper), True, (str(lower),), prefix))
    st = os.lstat(upper / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(upper / "opq", prefix + "overlay.opaque") == b"y"
    assert not os.path.exists(upper / "kept" / "k")  # only the layer's own entries
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if prefix == "user.":
        opts += ",userxattr"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode and prefix == "user.":
        pytest.skip(f"this kernel's overlayfs has no userxattr: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    try:
        assert sorted(os.listdir(merged)) == ["kept", "link-to-lower", "opq", "target"]
        assert os.listdir(merged / "opq") == ["new"]
        assert sorted(os.listdir(merged / "kept")) == ["added", "k"]
        assert (merged / "link-to-lower").read_text() == "t"
    finally:
        subprocess.run(["umount", str(merged)], check=True)
