"""erofs backend options and preconditions (no mounts: these fail before any)."""

from __future__ import annotations

from pathlib import Path

import pytest

import stratasnap.backends.erofs as eb
import stratasnap.fs.image as fi
from stratasnap import open_snapshotter
from stratasnap.backends.erofs_options import DEFAULT_COMPRESSION, ErofsOptions
from stratasnap.errors import FailedPrecondition, InvalidArgument
from stratasnap.fs.erofs_image import kernel_supports_erofs, mkfs_compressors


def test_options_from_toml_and_from_the_command_line() -> None:
    assert ErofsOptions.take({}) == ErofsOptions(compression=DEFAULT_COMPRESSION)
    toml = {
        "compression": "lz4hc",
        "mkfs_options": ["-T0", "--all-root"],
        "immutable": True,
        "convert_layers": False,
    }
    cli = {
        "compression": "lz4hc",
        "mkfs_options": "-T0,--all-root",
        "immutable": "yes",
        "convert_layers": "off",
    }
    assert ErofsOptions.take(dict(toml)) == ErofsOptions.take(dict(cli))
    assert not ErofsOptions.take(dict(cli)).convert_layers
    assert ErofsOptions.take({}).convert_layers
    rest: dict[str, object] = {"compression": "none", "default_size": "1GiB"}
    ErofsOptions.take(rest)
    assert rest == {"default_size": "1GiB"}  # the overlay backend's, left for it


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"compression": "zstd"}, "compression='zstd': expected one of none, lz4, lz4hc"),
        ({"immutable": "maybe"}, "erofs option immutable='maybe'"),
        ({"convert_layers": "sometimes"}, "erofs option convert_layers='sometimes'"),
        ({"mkfs_options": 3}, "erofs option mkfs_options=3"),
        ({"default_size": "lots"}, "erofs option default_size='lots'"),
        ({"bogus": 1}, "unknown option"),
    ],
)
def test_bad_options_are_invalid_argument(
    tmp_path: Path, options: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        open_snapshotter(tmp_path / "root", "erofs", **options)


def test_missing_mkfs_erofs_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(fi, "_SBIN", ())
    with pytest.raises(FailedPrecondition, match="install the Debian package erofs-utils"):
        open_snapshotter(tmp_path / "root", "erofs")


def test_kernel_without_erofs_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eb, "kernel_supports_erofs", lambda: False)
    monkeypatch.setattr(eb, "_erofs_module_available", lambda: False)
    with pytest.raises(FailedPrecondition, match="kernel has no EROFS filesystem"):
        open_snapshotter(tmp_path / "root", "erofs")


def test_a_compressor_mkfs_lacks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eb, "mkfs_compressors", lambda mkfs: frozenset({"lz4"}))
    with pytest.raises(InvalidArgument, match=r"compression='lz4hc'.* offers lz4"):
        open_snapshotter(tmp_path / "root", "erofs", compression="lz4hc")


def test_probes_read_the_system(tmp_path: Path) -> None:
    fake = tmp_path / "filesystems"
    fake.write_text("nodev\ttmpfs\n\text4\n")
    assert not kernel_supports_erofs(fake)
    fake.write_text("nodev\ttmpfs\n\terofs\n")
    assert kernel_supports_erofs(fake)
    assert {"lz4", "lz4hc"} <= mkfs_compressors(fi.find_tool("mkfs.erofs"))


def test_containerd_snippet_advertises_what_erofs_supports() -> None:
    from stratasnap.backends import backend_class
    from stratasnap.fs.overlay_probe import idmapped_layers_supported, in_user_namespace

    caps = backend_class("erofs").capabilities_for({"compression": "none", "immutable": "yes"})
    # EROFS took idmapped mounts in Linux 5.19, with overlayfs' idmapped layers.
    assert ("remap-ids" in caps) == idmapped_layers_supported()
    assert ("rebase" in caps) == (not in_user_namespace())
    assert caps == backend_class("overlay").capabilities_for({})
    slow = backend_class("erofs").capabilities_for({"slow_chown": "true"})
    assert "only-remap-ids" not in slow
    with pytest.raises(InvalidArgument, match="erofs option compression='zstd'"):
        backend_class("erofs").capabilities_for({"compression": "zstd"})
    with pytest.raises(InvalidArgument, match="unknown option"):
        backend_class("erofs").capabilities_for({"scratch_size": "1G"})


def test_recovery_that_fails_closes_its_scan_and_the_store(tmp_path: Path) -> None:
    from functools import partial

    from test_scandir_closed import _unclosed_scans

    root = tmp_path / "root"
    with open_snapshotter(root, "erofs") as sn:
        sn.prepare("a")
        [storage] = list(sn.snapshots_dir.iterdir())
    (storage / "layer.erofs").mkdir()  # a spare image that cannot be unlinked
    opening = partial(open_snapshotter, root, "erofs")
    assert _unclosed_scans(opening, IsADirectoryError) == []
