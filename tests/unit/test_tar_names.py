"""One rule for member names on both layer paths: the images applier and the EROFS
converter (``stratasnap.tarstream.split_name``): absolute names are scoped to the layer
root, as containerd does; ``..`` is refused by both."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import need
from erofs_layers import Member, build_tar

from stratasnap.erofs import UnsafeEntry, convert_tar
from stratasnap.errors import InvalidArgument
from stratasnap.images.apply import Target, apply_tar

ABSOLUTE = build_tar(
    [
        Member("/etc", "dir", mode=0o755),
        Member("/etc/abs", "file", data=b"absolute"),
        Member("/etc/abs-link", "hardlink", target="/etc/abs"),
        Member("//etc/./twice", "file", data=b"cleaned"),
        Member("./rel", "file", data=b"relative"),
    ]
)
WANT = {"etc": None, "etc/abs": b"absolute", "etc/abs-link": b"absolute", "etc/twice": b"cleaned"}
WANT["rel"] = b"relative"


def _tree(root: Path) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return found


def _applied(tar: bytes, dest: Path) -> dict[str, bytes | None]:
    dest.mkdir()
    apply_tar(io.BytesIO(tar), Target(str(dest)))
    return _tree(dest)


def _converted(tar: bytes, tmp_path: Path) -> dict[str, bytes | None]:
    need(shutil.which("fsck.erofs") is not None, "fsck.erofs (erofs-utils) not installed")
    image, dest = tmp_path / "layer.erofs", tmp_path / "extracted"
    convert_tar(io.BytesIO(tar), image)
    r = subprocess.run(["fsck.erofs", f"--extract={dest}", str(image)], capture_output=True)
    assert r.returncode == 0, r.stderr
    return _tree(dest)


def test_absolute_names_land_under_the_root_on_both_paths(tmp_path: Path) -> None:
    applied = _applied(ABSOLUTE, tmp_path / "applied")
    assert applied == WANT
    applied_link = os.stat(tmp_path / "applied" / "etc" / "abs-link")
    assert applied_link.st_ino == os.stat(tmp_path / "applied" / "etc" / "abs").st_ino
    assert _converted(ABSOLUTE, tmp_path) == WANT


@pytest.mark.parametrize(
    "members",
    [
        [Member("../escaped", "file", data=b"x")],
        [Member("/../escaped", "file", data=b"x")],
        [Member("/etc", "dir"), Member("/etc/../../escaped", "file", data=b"x")],
        [Member("h", "hardlink", target="/../etc/passwd")],
    ],
    ids=["dotdot", "absolute-dotdot", "dotdot-inside", "hardlink-absolute-dotdot"],
)
def test_dotdot_is_refused_on_both_paths(tmp_path: Path, members: list[Member]) -> None:
    tar = build_tar(members)
    with pytest.raises(InvalidArgument, match=r"'\.\.'"):
        _applied(tar, tmp_path / "applied")
    with pytest.raises(UnsafeEntry, match=r"'\.\.'"):
        convert_tar(io.BytesIO(tar), tmp_path / "layer.erofs")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "layer.erofs").exists()
