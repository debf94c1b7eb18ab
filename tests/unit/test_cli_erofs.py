"""``stratasnap erofs convert``: help, stdin, exit codes, nothing left on failure."""

from __future__ import annotations

import gzip
import hashlib
import json
import uuid
from pathlib import Path

from click.testing import CliRunner
from erofs_layers import Member, build_tar

from stratasnap.cli import cli
from stratasnap.erofs import format as fmt

TAR = build_tar([Member("etc", "dir"), Member("etc/hosts", "file", data=b"127.0.0.1 localhost\n")])


def test_help_teaches_usage() -> None:
    r = CliRunner().invoke(cli, ["erofs", "convert", "--help"])
    assert r.exit_code == 0
    assert "LAYER '-' reads standard input" in r.output
    assert "whiteout" in r.output


def test_convert_from_stdin_with_uuid(tmp_path: Path) -> None:
    u = uuid.uuid4()
    r = CliRunner().invoke(
        cli,
        ["erofs", "convert", "-", str(tmp_path / "l.erofs"), "--uuid", str(u), "--json"],
        input=TAR,
    )
    assert r.exit_code == 0, r.output
    stats = json.loads(r.output)
    assert stats["files"] == 1 and stats["directories"] == 1 and stats["tar_bytes"] == len(TAR)
    sb = (tmp_path / "l.erofs").read_bytes()[fmt.SUPER_OFFSET : fmt.SUPER_OFFSET + 128]
    assert int.from_bytes(sb[:4], "little") == fmt.MAGIC
    assert sb[48:64] == u.bytes


def test_convert_from_file(tmp_path: Path) -> None:
    (tmp_path / "l.tar").write_bytes(TAR)
    r = CliRunner().invoke(
        cli, ["erofs", "convert", str(tmp_path / "l.tar"), str(tmp_path / "i"), "--digest"]
    )
    assert r.exit_code == 0, r.output
    assert "3 inodes" in r.output
    assert f"diff ID: sha256:{hashlib.sha256(TAR).hexdigest()}" in r.output


def test_gzip_layers_are_decompressed(tmp_path: Path) -> None:
    (tmp_path / "l.tar.gz").write_bytes(gzip.compress(TAR))
    r = CliRunner().invoke(
        cli,
        ["erofs", "convert", str(tmp_path / "l.tar.gz"), str(tmp_path / "i"), "--digest"],
    )
    assert r.exit_code == 0, r.output
    # The diff ID is the digest of the uncompressed tar, as in an OCI image config.
    assert f"diff ID: sha256:{hashlib.sha256(TAR).hexdigest()}" in r.output


def test_bad_input_exit_code_and_no_file(tmp_path: Path) -> None:
    import zlib

    zstd_like = b"\x28\xb5\x2f\xfd" + zlib.compress(TAR)
    r = CliRunner().invoke(cli, ["erofs", "convert", "-", str(tmp_path / "i")], input=zstd_like)
    assert r.exit_code == 3
    assert "zstd-compressed; decompress it first" in r.output
    assert list(tmp_path.iterdir()) == []


def test_bad_uuid(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["erofs", "convert", "-", str(tmp_path / "i"), "--uuid", "x"])
    assert r.exit_code == 2 and "not a UUID" in r.output


def test_compression_option(tmp_path: Path) -> None:
    text = b"".join(b"127.0.0.%d host-%d.example.org\n" % (i % 256, i) for i in range(4000))
    tar = build_tar([Member("etc/hosts", "file", data=text)])
    sizes = {}
    for compression in ("none", "lz4"):
        image = tmp_path / f"{compression}.erofs"
        r = CliRunner().invoke(
            cli, ["erofs", "convert", "-", str(image), "--compression", compression], input=tar
        )
        assert r.exit_code == 0, r.output
        sizes[compression] = image.stat().st_size
    assert "1 files compressed" in r.output
    assert sizes["lz4"] < sizes["none"] / 2
    help_text = CliRunner().invoke(cli, ["erofs", "convert", "--help"]).output
    assert "--compression [none|lz4|lz4hc]" in help_text and "Linux 5.3" in help_text
    r = CliRunner().invoke(cli, ["erofs", "convert", "-", "x", "--compression", "zstd"], input=tar)
    assert r.exit_code == 2 and "'zstd' is not one of" in r.output
