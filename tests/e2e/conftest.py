"""Fixtures of the e2e suite: one private stratasnap + containerd per backend, the image.

``stack`` (session scope, one per Linux backend in ``stratasnap.backends.BACKENDS``)
mounts a tmpfs (and a btrfs loop filesystem on it for the btrfs backend's
store), starts the server on it with that backend, then a containerd
whose config names the server as its ``stratasnap`` proxy plugin. ``image``
builds the test image once per session. When a test fails, the end of both
daemons' logs is added to its report.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from conftest import IN_CI, make_loopfs, need, need_root

from stratasnap.backends import BACKENDS

from .harness import REQUIRED_TOOLS, HarnessError, Stack, unmount_below
from .oci import ImageInfo
from .testimage import build_image


def _is_linux_backend(name: str) -> bool:
    """Whether ``name`` is a backend a Linux containerd can mount (not windows/lcow/cimfs)."""
    module, _, cls_name = BACKENDS[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except Exception:
        return True  # a broken backend must show up as a failure, not vanish
    platforms = getattr(cls, "platforms", None) or getattr(cls, "platform", None)
    if isinstance(platforms, str):
        platforms = (platforms,)
    if platforms:
        return any(str(p).startswith("linux") for p in platforms)
    return not name.startswith(("windows", "lcow", "cim", "blockcim"))


LINUX_BACKENDS = sorted(n for n in BACKENDS if _is_linux_backend(n))


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImageInfo]:
    """(archive path, what it holds): the test image as an OCI archive."""
    need(shutil.which("ldd") is not None, "ldd not installed (builds the image's rootfs)")
    path = tmp_path_factory.mktemp("image") / "e2e-image.tar"
    return path, build_image(path)


@pytest.fixture(scope="session", params=LINUX_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def stack(backend: str) -> Iterator[Stack]:
    """stratasnap (``backend``) + containerd, on a tmpfs of their own; stopped at the end."""
    need_root()
    for tool in (*REQUIRED_TOOLS, "umount", "mount"):
        need(shutil.which(tool, path=_path()) is not None, f"{tool} not installed")
    with stack_base(backend) as (base, namespace):
        store_fs = None
        if backend == "btrfs":
            # Its root must be on btrfs: a loop filesystem (image on the tmpfs) under the store.
            (base / "btrfs").mkdir()
            store_fs = make_loopfs(base / "btrfs", "btrfs", "3G")
            (base / "stratasnap").symlink_to(store_fs)
        s = Stack(base, backend, namespace=namespace)
        if store_fs is not None:
            s.own_mounts.append(str(store_fs))
        with started(s):
            yield s


@contextlib.contextmanager
def stack_base(name: str, size: str = "4g") -> Iterator[tuple[Path, str]]:
    """(base, namespace) for a Stack: a tmpfs of its own, removed at the end (unless kept)."""
    base = Path(tempfile.mkdtemp(prefix=f"ss-e2e-{name}-", dir="/tmp"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(base)], check=True
    )
    # Unique: runc's state (/run/containerd/runc/<namespace>/<id>) and the cgroups
    # (/<namespace>/<id>) are shared by every containerd on the machine.
    namespace = re.sub(r"[^A-Za-z0-9]+", "-", f"stratasnap-e2e-{name}-{os.getpid()}")
    try:
        yield base, namespace
    finally:
        if IN_CI or not _keep():
            unmount_below(base, include_base=True)
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def started(s: Stack) -> Iterator[Stack]:
    """Both daemons of ``s`` running; closed at the end. A server that cannot start skips."""
    try:
        try:
            s.stratasnapd.start()
        except HarnessError as e:
            # A backend whose needs are missing here: skip locally, fail under CI.
            need(False, f"backend {s.backend!r}: stratasnap did not start: {e}")
        s.containerd.start()
        yield s
    finally:
        s.close()


def _path() -> str:
    return os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"


def _keep() -> bool:
    """STRATASNAP_E2E_KEEP=1 leaves the daemons' directories (logs, stores) for a look."""
    return os.environ.get("STRATASNAP_E2E_KEEP", "") not in ("", "0")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        s = getattr(item, "funcargs", {}).get("stack")
        if isinstance(s, Stack):
            report.sections.append(("daemon logs", s.log_tails(60)))
    return report
