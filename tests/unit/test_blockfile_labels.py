"""Blockfile: options, the template, size and VM labels, failed and killed copies.

No mounts here (mkfs, resize2fs and e2fsck work on image files without
root); the privileged tests mount what these make.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need

from stratasnap import open_snapshotter
from stratasnap.backends.blockfile import BlockfileSnapshotter
from stratasnap.backends.blockfile_config import (
    MAX_SIZE_LABEL,
    SIZE_BYTES_LABEL,
    SIZE_GB_LABEL,
    VM_SCRATCH_LABEL,
    BlockfileConfig,
    ScratchRequest,
    parse_size,
)
from stratasnap.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from stratasnap.fs import image as fsimage
from stratasnap.types import Kind

MiB = 1 << 20
GiB = 1 << 30
SBIN = "/usr/sbin:/sbin"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=SBIN)
    need(found is not None, f"{name} not installed")
    assert found is not None
    return found


def fs_bytes(image: Path) -> int:
    """The size of the ext4 filesystem inside ``image`` (block count x block size)."""
    out = subprocess.run(
        [_tool("dumpe2fs"), "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


@pytest.fixture
def root(scratch: Path) -> Path:
    _tool("mkfs.ext4")
    return scratch / "root"


@pytest.fixture
def sn(root: Path) -> Iterator[BlockfileSnapshotter]:
    s = BlockfileSnapshotter(root, scratch_size="64M")
    try:
        yield s
    finally:
        s.close()


def leftovers(root: Path) -> list[str]:
    return sorted(os.listdir(root / "snapshots"))


# -- options -----------------------------------------------------------------------


def test_option_values_typed_or_text() -> None:
    cfg, rest = BlockfileConfig.from_options(
        {
            "scratch_size": "64MiB",
            "fs_type": "xfs",
            "mkfs_options": "-m reflink=1",
            "recreate_scratch": "true",
            "vm_scratch_template": "/x/vm.img",
            "other": 1,
        }
    )
    assert cfg == BlockfileConfig(
        scratch_size=64 * MiB,
        fs_type="xfs",
        mkfs_options=("-m", "reflink=1"),
        recreate_scratch=True,
        vm_scratch_template=Path("/x/vm.img"),
    )
    assert rest == {"other": 1}  # left for the base class, which refuses it
    typed, _ = BlockfileConfig.from_options(
        {"scratch_size": 4096, "mkfs_options": ["-b", "4096"], "recreate_scratch": False}
    )
    assert (typed.scratch_size, typed.mkfs_options, typed.recreate_scratch) == (
        4096,
        ("-b", "4096"),
        False,
    )
    assert BlockfileConfig.from_options({})[0] == BlockfileConfig()
    assert BlockfileConfig().scratch_size == 10 * GiB


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("scratch_size", "ten gigs"),
        ("scratch_size", 0),
        ("scratch_size", -5),
        ("scratch_size", True),
        ("fs_type", "btrfs"),
        ("recreate_scratch", "maybe"),
        ("mkfs_options", 7),
        ("scratch_file", 3),
    ],
)
def test_bad_option_is_invalid_argument_naming_it(key: str, value: object, root: Path) -> None:
    with pytest.raises(InvalidArgument, match=key):
        BlockfileSnapshotter(root, **{key: value})


def test_unknown_option_refused(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="scratch_sise"):
        open_snapshotter(root, "blockfile", scratch_sise="64M")


def test_parse_size_units() -> None:
    assert parse_size("4096", "s") == 4096
    assert parse_size("1k", "s") == 1024
    assert parse_size("64M", "s") == 64 * MiB
    assert parse_size("10GiB", "s") == 10 * GiB
    assert parse_size("2 GB", "s") == 2 * GiB


# -- the template ----------------------------------------------------------------------


def test_template_made_once_sparse_and_kept(root: Path) -> None:
    with BlockfileSnapshotter(root, scratch_size="64M") as s:
        template = s.template
        assert fsimage.probe_fs_type(template) == "ext4"
        st = os.stat(template)
        assert st.st_size == 64 * MiB
        assert st.st_blocks * 512 < 8 * MiB  # sparse: lazy init, no discard
        inode = st.st_ino
    with BlockfileSnapshotter(root, scratch_size="128M") as s:
        assert os.stat(s.template).st_ino == inode  # existing template kept
    with BlockfileSnapshotter(root, scratch_size="128M", recreate_scratch=True) as s:
        assert os.stat(s.template).st_size == 128 * MiB
    assert not [n for n in os.listdir(root) if ".tmp-" in n]


def test_template_leftover_of_killed_build_removed(root: Path) -> None:
    root.mkdir(parents=True)
    (root / ".scratch.img.tmp-abc123").write_bytes(b"half a filesystem")
    with BlockfileSnapshotter(root, scratch_size="64M"):
        pass
    assert not (root / ".scratch.img.tmp-abc123").exists()


def test_scratch_file_copied_as_template(root: Path, scratch: Path) -> None:
    src = scratch / "user.img"
    fsimage.make_image(src, 32 * MiB, "ext4", ("-L", "userlabel"))
    with BlockfileSnapshotter(root, scratch_file=str(src)) as s:
        assert os.stat(s.template).st_size == 32 * MiB
        mounts = s.prepare("a")
        assert os.stat(mounts[0].source).st_size == 32 * MiB
    garbage = scratch / "garbage.img"
    garbage.write_bytes(b"\0" * 65536)
    with pytest.raises(InvalidArgument, match="no ext4 or xfs"):
        BlockfileSnapshotter(scratch / "root2", scratch_file=str(garbage))


def test_fs_type_must_match_existing_template(root: Path) -> None:
    BlockfileSnapshotter(root, scratch_size="64M").close()
    with pytest.raises(InvalidArgument, match="recreate_scratch"):
        BlockfileSnapshotter(root, fs_type="xfs")


def test_missing_mkfs_names_the_debian_package(
    root: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = scratch / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(fsimage, "_SBIN", (str(empty),))
    with pytest.raises(FailedPrecondition, match=r"mkfs\.xfs not found.*xfsprogs"):
        BlockfileSnapshotter(root, fs_type="xfs")
    with pytest.raises(FailedPrecondition, match=r"mkfs\.ext4 not found.*e2fsprogs"):
        BlockfileSnapshotter(scratch / "other", scratch_size="64M")
    with pytest.raises(fsimage.MissingTool) as err:
        fsimage.find_tool("resize2fs")
    assert err.value.package == "e2fsprogs" and err.value.errno == errno.ENOENT


def test_mkfs_failure_is_a_clear_error(root: Path) -> None:
    # Debian 12's mkfs.xfs refuses filesystems under 300 MB: its words reach the user.
    _tool("mkfs.xfs")
    with pytest.raises(InvalidArgument, match=r"mkfs\.xfs exited") as err:
        BlockfileSnapshotter(root, fs_type="xfs", scratch_size="64M")
    assert "larger than 300" in str(err.value) and "Usage" not in str(err.value)
    assert not [n for n in os.listdir(root) if "scratch.img" in n]


def test_tool_failure_keeps_what_the_tool_said() -> None:
    err = fsimage.ToolFailed(
        ["/usr/sbin/resize2fs", "x.img"],
        1,
        "resize2fs 1.47.0 (5-Feb-2023)\nresize2fs: New size smaller than minimum (95)\n",
    )
    assert err.errno == errno.EIO and err.filename == "x.img"
    assert err.strerror == "resize2fs exited with 1: resize2fs: New size smaller than minimum (95)"


# -- prepare, view, mounts ---------------------------------------------------------------


def test_prepare_copies_template_or_parent(sn: BlockfileSnapshotter, root: Path) -> None:
    (m,) = sn.prepare("a")
    assert m.type == "ext4" and m.options == ("loop", "rw") and m.target == ""
    image = Path(m.source)
    assert image == root / "snapshots" / image.parent.name / "rootfs.img"
    assert image.read_bytes()[:8192] == sn.template.read_bytes()[:8192]
    sn.commit("c", "a")
    (child,) = sn.prepare("b", "c")
    assert Path(child.source) != image and Path(child.source).name == "rootfs.img"
    # A view mounts the parent's image read-only, without a copy of its own.
    (view,) = sn.view("v", "c")
    assert view.source == str(image)
    assert view.options == ("loop", "ro", "noload")
    assert sn.mounts("v") == [view]
    assert sn.mounts("b") == [child]
    # A view without a parent gets a (read-only) copy of the template.
    (lone,) = sn.view("lone", "")
    assert Path(lone.source).name == "rootfs.img" and "ro" in lone.options


def test_sparse_copy_keeps_holes(sn: BlockfileSnapshotter) -> None:
    (m,) = sn.prepare("a")
    st = os.stat(m.source)
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 <= os.stat(sn.template).st_blocks * 512 + MiB


# -- size labels ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "size", "label"),
    [
        ({SIZE_BYTES_LABEL: str(96 * MiB)}, 96 * MiB, SIZE_BYTES_LABEL),
        ({SIZE_GB_LABEL: "2"}, 2 * GiB, SIZE_GB_LABEL),
        # bytes preferred to the deprecated GiB label, even when smaller
        ({SIZE_BYTES_LABEL: str(96 * MiB), SIZE_GB_LABEL: "2"}, 96 * MiB, SIZE_BYTES_LABEL),
        # max-size is a request too; the largest one wins
        (
            {SIZE_BYTES_LABEL: str(96 * MiB), MAX_SIZE_LABEL: str(128 * MiB)},
            128 * MiB,
            MAX_SIZE_LABEL,
        ),
        (
            {SIZE_BYTES_LABEL: str(128 * MiB), MAX_SIZE_LABEL: str(96 * MiB)},
            128 * MiB,
            SIZE_BYTES_LABEL,
        ),
        ({SIZE_GB_LABEL: "1", MAX_SIZE_LABEL: str(96 * MiB)}, GiB, SIZE_GB_LABEL),
        ({SIZE_BYTES_LABEL: "0"}, 0, ""),  # 0 asks for nothing, as in containerd
        ({"unrelated": "x"}, 0, ""),
    ],
)
def test_size_request_precedence(labels: dict[str, str], size: int, label: str) -> None:
    req = ScratchRequest.from_labels(labels)
    assert (req.size, req.size_label, req.vm_scratch) == (size, label, False)


def test_deprecated_gb_label_warns_naming_both(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stratasnap.backends.blockfile"):
        ScratchRequest.from_labels({SIZE_GB_LABEL: "1"})
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING
    assert SIZE_GB_LABEL in rec.getMessage() and SIZE_BYTES_LABEL in rec.getMessage()
    assert "deprecated" in rec.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stratasnap.backends.blockfile"):
        ScratchRequest.from_labels({SIZE_BYTES_LABEL: "4096"})
    assert caplog.records == []


@pytest.mark.parametrize("label", [SIZE_BYTES_LABEL, SIZE_GB_LABEL, MAX_SIZE_LABEL])
@pytest.mark.parametrize("value", ["ten", "-1", "+5", " 5", "5_0", "1.5", "0x10", "9" * 30])
def test_malformed_size_is_invalid_argument_and_leaves_nothing(
    sn: BlockfileSnapshotter, root: Path, label: str, value: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        sn.prepare("k", labels={label: value})
    assert label in str(err.value) and repr(value) in str(err.value)
    with pytest.raises(NotFound):
        sn.stat("k")
    assert leftovers(root) == []


def test_size_label_grows_image_and_filesystem(sn: BlockfileSnapshotter) -> None:
    _tool("resize2fs")
    (m,) = sn.prepare("big", labels={SIZE_BYTES_LABEL: str(160 * MiB)})
    image = Path(m.source)
    assert os.stat(image).st_size == 160 * MiB
    assert fs_bytes(image) == 160 * MiB
    assert os.stat(image).st_blocks * 512 < 16 * MiB  # still sparse
    # A child starts from the grown parent; it may grow further, never shrink.
    sn.commit("big-c", "big")
    (child,) = sn.prepare("child", "big-c")
    assert os.stat(child.source).st_size == 160 * MiB
    (grown,) = sn.prepare("grown", "big-c", labels={SIZE_GB_LABEL: "1"})
    assert fs_bytes(Path(grown.source)) == GiB


def test_grow_of_an_image_committed_while_dirty(sn: BlockfileSnapshotter) -> None:
    # resize2fs refuses a filesystem mounted since its last check, or not
    # cleanly unmounted; the e2fsck before it copes with such a parent.
    _tool("resize2fs")
    (m,) = sn.prepare("a")
    for field, value in (
        ("mtime", "20260101000000"),
        ("lastcheck", "20250101000000"),
        ("state", "0"),
    ):
        subprocess.run(
            [_tool("debugfs"), "-w", "-R", f"ssv {field} {value}", m.source],
            check=True,
            capture_output=True,
        )
    sn.commit("c", "a")
    (child,) = sn.prepare("b", "c", labels={SIZE_BYTES_LABEL: str(80 * MiB)})
    assert fs_bytes(Path(child.source)) == 80 * MiB


def test_smaller_than_parent_refused_and_leaves_nothing(
    sn: BlockfileSnapshotter, root: Path
) -> None:
    sn.prepare("a", labels={SIZE_BYTES_LABEL: str(128 * MiB)})
    sn.commit("c", "a")
    before = leftovers(root)
    for labels in (
        {SIZE_BYTES_LABEL: str(96 * MiB)},
        {MAX_SIZE_LABEL: str(64 * MiB)},
        {SIZE_BYTES_LABEL: "1"},
    ):
        with pytest.raises(InvalidArgument, match="smaller") as err:
            sn.prepare("k", "c", labels=labels)
        (label,) = labels
        assert label in str(err.value)
    with pytest.raises(InvalidArgument, match="smaller"):
        sn.prepare("k", labels={SIZE_BYTES_LABEL: str(32 * MiB)})  # the template is 64M
    with pytest.raises(NotFound):
        sn.stat("k")
    assert leftovers(root) == before


def test_size_labels_ignored_on_views(sn: BlockfileSnapshotter) -> None:
    sn.prepare("a")
    sn.commit("c", "a")
    (v,) = sn.view("v", "c", labels={SIZE_BYTES_LABEL: "garbage", VM_SCRATCH_LABEL: "true"})
    assert "ro" in v.options
    assert sn.stat("v").kind is Kind.VIEW


def test_equal_size_request_is_no_change(sn: BlockfileSnapshotter) -> None:
    (m,) = sn.prepare("a", labels={SIZE_BYTES_LABEL: str(64 * MiB)})
    assert os.stat(m.source).st_size == 64 * MiB


# -- the VM scratch disk ------------------------------------------------------------------


def test_vm_scratch_without_template_refused_and_leaves_nothing(
    sn: BlockfileSnapshotter, root: Path
) -> None:
    with pytest.raises(FailedPrecondition, match="vm_scratch_template"):
        sn.prepare("k", labels={VM_SCRATCH_LABEL: "true"})
    with pytest.raises(NotFound):
        sn.stat("k")
    assert leftovers(root) == []


def test_vm_scratch_template_missing_refused(root: Path, scratch: Path) -> None:
    with BlockfileSnapshotter(
        root, scratch_size="64M", vm_scratch_template=str(scratch / "nope.img")
    ) as s:
        with pytest.raises(FailedPrecondition, match="does not exist"):
            s.prepare("k", labels={VM_SCRATCH_LABEL: "true"})
        assert leftovers(root) == []
        assert s.prepare("plain")  # only snapshots that ask need it


def test_vm_scratch_disk_made_and_mounted_at_vm(root: Path, scratch: Path) -> None:
    vm = scratch / "vm-template.img"
    fsimage.make_image(vm, 32 * MiB, "ext4")
    with BlockfileSnapshotter(root, scratch_size="64M", vm_scratch_template=str(vm)) as s:
        mounts = s.prepare("k", labels={VM_SCRATCH_LABEL: "true"})
        assert len(mounts) == 2
        main, vm_mount = mounts
        assert vm_mount.target == "/vm"
        assert vm_mount.type == "ext4" and vm_mount.options == ("loop", "rw")
        vm_image = Path(vm_mount.source)
        assert vm_image == Path(main.source).parent / "vm" / "scratch.img"
        assert os.stat(vm_image).st_size == 32 * MiB
        assert s.mounts("k") == mounts
        assert len(s.prepare("plain")) == 1
        usage_with_vm = s.usage("k").size
        assert usage_with_vm >= os.stat(vm_image).st_blocks * 512
        s.remove("k")
        assert not vm_image.exists()


# -- usage -------------------------------------------------------------------------------


def test_usage_is_image_minus_parent(sn: BlockfileSnapshotter) -> None:
    (m,) = sn.prepare("a")
    u = sn.usage("a")
    assert u.size == os.stat(m.source).st_blocks * 512
    # The image file, plus ext4's reserved inodes and root (the filesystem's own;
    # no lost+found).
    assert u.inodes == 1 + fsimage.used_inodes(m.source) >= 11
    sn.commit("c", "a")
    assert sn.usage("c") == u  # stored at commit
    sn.prepare("b", "c")
    child = sn.usage("b")
    assert child.inodes == 1  # its image; no files beyond the parent's
    assert child.size <= 64 * 1024  # a sparse copy allocates what the parent did
    sn.view("v", "c")
    assert sn.usage("v").size == 0


# -- failed and killed copies -------------------------------------------------------------


def test_failed_copy_leaves_nothing(
    sn: BlockfileSnapshotter, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stratasnap.fs import _data

    def full(self: object, src: int, dst: int, start: int, end: int) -> None:
        os.pwrite(dst, b"x" * 4096, start)  # part of it made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_data.DataCopier, "_copy_range", full)
    monkeypatch.setattr(_data.DataCopier, "_clone", lambda self, s, d: False)
    with pytest.raises(ResourceExhausted):
        sn.prepare("k")
    with pytest.raises(NotFound):
        sn.stat("k")
    assert leftovers(root) == []


def test_killed_copy_leaves_nothing(root: Path) -> None:
    BlockfileSnapshotter(root, scratch_size="64M").close()  # the template exists
    script = textwrap.dedent(
        f"""
        import os, signal
        from stratasnap.fs import _data
        real = _data.DataCopier._copy_range
        def copy_then_die(self, src, dst, start, end):
            real(self, src, dst, start, end)  # some data is in the copy...
            os.kill(os.getpid(), signal.SIGKILL)  # ...and then the process dies
        _data.DataCopier._copy_range = copy_then_die
        _data.DataCopier._clone = lambda self, s, d: False
        from stratasnap import open_snapshotter
        open_snapshotter({str(root)!r}, "blockfile").prepare("k")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    # What the kill left is a work directory that no snapshot owns...
    left = leftovers(root)
    assert left and all(n.startswith("new-") for n in left)
    with BlockfileSnapshotter(root) as s:
        with pytest.raises(NotFound):
            s.stat("k")
        # ...which cleanup() reclaims, partial image and all.
        got = s.cleanup()
        assert [Path(p).name for p in got.paths] == left
        assert leftovers(root) == []
        assert s.prepare("k")  # and the key is free


def test_a_hung_tool_is_killed_and_fails_the_call(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = scratch / "hung-bin"
    bin_dir.mkdir()
    tool = bin_dir / "mkfs.ext4"
    tool.write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 20\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(fsimage, "_SBIN", (str(bin_dir),))
    monkeypatch.setattr(fsimage, "TOOL_TIMEOUT_S", 0.5)
    started = time.monotonic()
    with pytest.raises(OSError) as err:
        fsimage.make_image(scratch / "x.img", 8 * MiB)
    assert time.monotonic() - started < 10
    assert err.value.errno == errno.ETIMEDOUT
    assert "mkfs.ext4 did not finish in 0.5 s" in str(err.value)
    assert [p.name for p in scratch.iterdir()] == ["hung-bin"]  # no half-made image


# -- an empty root -----------------------------------------------------------------------


def test_template_root_is_empty_even_when_made_by_an_older_stratasnap(root: Path) -> None:
    _tool("debugfs")
    s = BlockfileSnapshotter(root, scratch_size="64M")
    template = s.template
    s.close()
    assert not fsimage.has_lost_found(template)
    # What mkfs.ext4 leaves, and what templates made before had.
    subprocess.run(
        ["debugfs", "-w", "-R", "mkdir lost+found", str(template)], check=True, capture_output=True
    )
    assert fsimage.has_lost_found(template)
    BlockfileSnapshotter(root, scratch_size="64M").close()
    assert not fsimage.has_lost_found(template)
    assert fsimage.probe_fs_type(template) == "ext4"
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
