"""idmapped_layers_supported(): asked of the kernel by a real mount, cached, with fallbacks."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
from conftest import need_root

from stratasnap.fs import idmapped, overlay_probe
from stratasnap.fs.mount import bind, mounts_under
from stratasnap.fs.overlay_probe import idmapped_layers_supported

pytestmark = pytest.mark.privileged


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlay_probe, "_IDMAP_PROBED", {})


def test_probe_mounts_and_leaves_nothing(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_root()
    calls: list[str] = []
    real = idmapped.apply_idmapped_mounts

    def counted(mounts, target):  # type: ignore[no-untyped-def]
        calls.append(str(target))
        real(mounts, target)

    monkeypatch.setattr(idmapped, "apply_idmapped_mounts", counted)
    first = idmapped_layers_supported(scratch)
    assert calls and calls[0].startswith(f"{scratch}/.idmap-probe-")  # a real attempt
    # This kernel (and tmpfs since 6.3) takes idmapped overlay lowers: the probe says so
    # because the mapped owner showed, which test_overlay_idmap checks end to end.
    if overlay_probe._release_at_least(6, 3):
        assert first is True
    assert os.listdir(scratch) == [] and mounts_under(scratch) == []
    # Cached per filesystem: another directory on it asks nothing new.
    (scratch / "other").mkdir()
    assert idmapped_layers_supported(scratch / "other") is first
    assert len(calls) == 1


def test_a_refused_mount_means_unsupported(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a kernel before 5.19 (or a lower filesystem without idmaps) answers: EINVAL."""
    need_root()

    def refuse(mounts, target):  # type: ignore[no-untyped-def]
        raise OSError(errno.EINVAL, "overlayfs: idmapped layers are not supported", str(target))

    monkeypatch.setattr(idmapped, "apply_idmapped_mounts", refuse)
    assert idmapped_layers_supported(scratch) is False
    assert os.listdir(scratch) == []


def test_without_privileges_the_kernel_version_decides(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "5.18.0", "", "")))
    assert idmapped_layers_supported(scratch) is False
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "6.1.0-21", "", "")))
    assert idmapped_layers_supported(scratch) is True  # not cached: no probe was made
    assert overlay_probe._IDMAP_PROBED == {}


def test_leftovers_of_a_killed_probe_are_swept_and_a_live_one_kept(scratch: Path) -> None:
    need_root()
    src = scratch / "src"
    src.mkdir()
    stale = scratch / ".idmap-probe-killed"
    (stale / "mnt").mkdir(parents=True)
    bind(src, stale / "mnt")  # killed while its overlay was mounted
    live = scratch / ".idmap-probe-live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a probe running in another process holds it
        idmapped_layers_supported(scratch)
        assert sorted(os.listdir(scratch)) == [".idmap-probe-live", "src"]
        assert mounts_under(scratch) == []
    finally:
        os.close(fd)
