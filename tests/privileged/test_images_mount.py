"""``stratasnap image mount`` puts an image's rootfs at a directory: a view, or writable."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import need_root
from e2e.oci import Layer, write_oci_archive

from stratasnap.cli import cli


def _run(*args: str, code: int = 0) -> str:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r.output


@pytest.mark.parametrize("backend", ["native", "overlay", "blockfile"])
def test_image_mount_view_and_rw(backend: str, scratch: Path) -> None:
    need_root()
    archive = scratch / "img.tar"
    write_oci_archive(archive, "example.com/m:1", [Layer().dir("etc").file("etc/id", "m\n")])
    base = ["--root", str(scratch / "root"), "--backend", backend]
    _run(*base, "image", "import", str(archive))
    ro, rw = scratch / "ro", scratch / "rw"
    ro.mkdir()
    rw.mkdir()
    key = _run(*base, "image", "mount", "example.com/m:1", str(ro)).strip()
    try:
        assert (ro / "etc" / "id").read_text() == "m\n"
        with pytest.raises(OSError):
            (ro / "new").write_text("x")  # a view is read-only
        _run(*base, "image", "mount", "example.com/m:1", str(rw), "--rw", "--key", "work")
        try:
            (rw / "new").write_text("x")
        finally:
            subprocess.run(["umount", str(rw)], check=True)
        info = json.loads(_run(*base, "info", "work"))
        assert info["kind"] == "active"
        # The same key again is AlreadyExists (exit 5), and nothing is mounted.
        _run(*base, "image", "mount", "example.com/m:1", str(rw), "--key", "work", code=5)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    _run(*base, "rm", key, "work")
