"""erofs crash safety: a process killed (SIGKILL) before any step of commit or remove.

crashkit's kill-at-step loop (tests/crashkit.py) with erofs's scenario: the
child counts every storage step (image build or tar conversion, rename,
mkdir, unlink, rmtree, mount, unmount, fsync, immutable flag, store commit;
the converter's own renames and unlinks too) and kills
itself just before step N. For every N until the operation finishes, the
test reopens the store (a restart), runs cleanup(), and checks every
snapshot: the operation happened entirely or not at all, active snapshots
still hold all their files, committed layers have their image (matching
the recorded digest) mounted with the right content, and nothing is left
that no snapshot owns: no directory, no mount, no loop device.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import need_root
from crashkit import COMMON_STEPS, CrashRun

from stratasnap import Kind, open_snapshotter
from stratasnap.backends.erofs import DIGEST_DETAIL, IMAGE, ErofsSnapshotter
from stratasnap.fs.erofs_image import file_sha256
from stratasnap.fs.loop import backing_files
from stratasnap.fs.manifest import manifest
from stratasnap.fs.mount import mounts_under, unmount_all_under
from stratasnap.testing import mounted

pytestmark = pytest.mark.privileged

#: The steps counted in the child besides crashkit's: the image's own, and every
#: unlink, rmdir and unmount (module:attribute, see crashkit.CHILD).
STEPS = (
    *COMMON_STEPS,
    "os:unlink",
    "os:rmdir",
    *(
        f"stratasnap.backends.erofs:{name}"
        for name in ("build_image", "mount_image", "unmount", "fsync_path", "set_immutable")
    ),
    "stratasnap.fs.mount:unmount",
    "stratasnap.backends.erofs:convert_tar",
    "stratasnap.backends.erofs:describe",
)
#: How the child runs each operation (``sn``: the open snapshotter; ``argv``: child_args).
OP_CODE = {
    "commit": 'sn.commit("child-committed", "active")',
    "remove": 'sn.remove("leaf")',
    "cleanup": "sn.cleanup()",
    # The same changes as "active" holds, as a layer tar (argv[0]), into the empty "fresh".
    "convert": (
        'with open(argv[0], "rb") as tar:\n'
        '    sn.convert_layer("fresh", tar)\n'
        'sn.commit("child-committed", "fresh")'
    ),
}


def _content(root: Path) -> dict[str, object]:
    return {k: (e.kind, e.mode, e.sha256, e.xattrs) for k, e in manifest(root).items()}


def _storage(sn: ErofsSnapshotter, key: str) -> Path:
    with sn._store.read() as tx:
        return sn.storage_dir(tx.get(key).id)


def _setup(root: Path, mnt: Path, options: dict[str, object]) -> dict[str, dict[str, object]]:
    """base (committed) <- leaf (committed); active on base with a whiteout and data."""
    digests: dict[str, dict[str, object]] = {}
    with open_snapshotter(root, "erofs", **options) as sn:
        with mounted(sn.prepare("base-a"), mnt) as r:
            (r / "dir").mkdir()
            (r / "dir" / "a").write_bytes(b"A" * 5000)
            (r / "b").write_text("bee")
        sn.commit("base", "base-a")
        with mounted(sn.prepare("leaf-a", "base"), mnt) as r:
            (r / "leaf-only").write_text("leaf")
        sn.commit("leaf", "leaf-a")
        with mounted(sn.prepare("active", "base"), mnt) as r:
            (r / "written").write_text("in the active snapshot")
            (r / "b").unlink()  # a whiteout in the upper, to carry into the image
            digests["active"] = _content(r)
        with mounted(sn.prepare("fresh", "base"), mnt) as r:
            digests["fresh"] = _content(r)
        for name in ("base", "leaf"):
            with mounted(sn.view(f"v-{name}", name), mnt) as r:
                digests[name] = _content(r)
            sn.remove(f"v-{name}")
        sn.cleanup()
    return digests


def _layer_tar(path: Path) -> Path:
    """The changes _setup makes in "active", as a layer tar: a new file, a whiteout."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        data = b"in the active snapshot"
        info = tarfile.TarInfo("written")
        info.size, info.mode = len(data), 0o644
        tf.addfile(info, io.BytesIO(data))
        tf.addfile(tarfile.TarInfo(".wh.b"))
    return path


def _loops_under(root: Path) -> list[str]:
    prefix = str(root) + "/"
    return [backing for _, backing in backing_files() if backing.startswith(prefix)]


def _stray(root: Path, ids: set[str], backing: str) -> bool:
    top = Path(backing).relative_to(root / "snapshots").parts[0]
    return top not in ids or backing.endswith(" (deleted)")


def _wait_loops(root: Path, bad: Callable[[str], bool]) -> list[str]:
    # Autoclear devices are released a moment after their last unmount.
    deadline = time.monotonic() + 10
    found = [b for b in _loops_under(root) if bad(b)]
    while found and time.monotonic() < deadline:
        time.sleep(0.01)
        found = [b for b in _loops_under(root) if bad(b)]
    return found


def _check(
    root: Path, mnt: Path, digests: dict[str, dict[str, object]], options: dict[str, object]
) -> dict[str, Kind]:
    with open_snapshotter(root, "erofs", **options) as sn:
        assert isinstance(sn, ErofsSnapshotter)
        sn.cleanup()
        infos = {i.name: i for i in sn.walk()}
        expected = set()
        for name, info in infos.items():
            storage = _storage(sn, name)
            if info.kind is Kind.COMMITTED:
                image = storage / IMAGE
                assert sn.details(name)[DIGEST_DETAIL] == "sha256:" + file_sha256(image)
                assert sorted(os.listdir(storage)) == ["fs", IMAGE], f"{name}: leftovers"
                with mounted(sn.view(f"check-{name}", name), mnt) as r:
                    content = _content(r)
                sn.remove(f"check-{name}")
                expected.add(storage / "fs")
            else:
                assert not os.path.lexists(storage / IMAGE), f"{name}: a spare image"
                expected.add(storage)  # a size-limited upper's filesystem
                with mounted(sn.mounts(name), mnt) as r:
                    content = _content(r)
            want = digests["active" if name == "child-committed" else name]
            assert content == want, f"content of {name} changed"
        sn.cleanup()
        with sn._store.read() as tx:
            ids = {str(i) for i in tx.id_map()}
        left = set(os.listdir(root / "snapshots"))
        assert left == ids, f"unowned storage left: {sorted(left - ids)}"
        # Mounts: committed layers' images, limited uppers, nothing else.
        assert set(mounts_under(root)) <= expected
        stray = _wait_loops(root, lambda b: _stray(root, ids, b))
        assert not stray, f"loop devices left: {stray}"
        return {n: i.kind for n, i in infos.items()}


def _committed(kinds: dict[str, Kind]) -> bool:
    return kinds.get("child-committed") is Kind.COMMITTED and "active" not in kinds


def _converted(kinds: dict[str, Kind]) -> bool:
    return kinds.get("child-committed") is Kind.COMMITTED and "fresh" not in kinds


@pytest.mark.parametrize(
    ("op", "options", "done"),
    [
        ("commit", {}, _committed),
        ("commit", {"immutable": True}, _committed),
        ("commit", {"default_size": "32MiB"}, _committed),
        ("remove", {"immutable": True}, lambda k: "leaf" not in k),
        ("remove", {"sync_remove": True}, lambda k: "leaf" not in k),
        ("cleanup", {}, lambda k: True),
        ("convert", {"compression": "none", "immutable": True}, _converted),
        ("convert", {"compression": "none", "default_size": "32MiB"}, _converted),
    ],
    ids=[
        "commit",
        "commit-immutable",
        "commit-limited",
        "remove",
        "remove-sync",
        "cleanup",
        "convert-immutable",
        "convert-limited",
    ],
)
def test_kill_at_every_step(
    loopfs: Callable[..., Path],
    op: str,
    options: dict[str, object],
    done: Callable[[dict[str, Kind]], bool],
) -> None:
    # ext4: images are file-backed where the kernel can, and immutable flags stick.
    need_root()
    base = loopfs("ext4", size="512M")
    ErofsCrash(base, options).kill_at_every_step(op, done)


class ErofsCrash(CrashRun):
    """crashkit's loop with erofs's scenario: real mounts, images, loop devices."""

    op_code = OP_CODE
    steps = STEPS

    def __init__(self, base: Path, options: dict[str, object]) -> None:
        super().__init__(base, "erofs", options)
        self.mnt = base / "mnt"
        self.mnt.mkdir()

    def setup_root(self, root: Path) -> dict[str, Any]:
        return _setup(root, self.mnt, self.options)

    def check_consistent(self, root: Path, digests: dict[str, Any]) -> dict[str, Kind]:
        return _check(root, self.mnt, digests, self.options)

    def child_args(self, root: Path) -> list[str]:
        return [str(_layer_tar(root.parent / "layer.tar"))]

    def release(self, root: Path) -> None:
        unmount_all_under(root)
        assert _wait_loops(root, lambda b: True) == []
