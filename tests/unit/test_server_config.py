"""The server's TOML config, the default config text and the containerd snippet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from stratasnap.cli import cli
from stratasnap.server.config import (
    DEFAULT_ADDRESS,
    DEFAULT_ROOT,
    Config,
    ConfigError,
    FastPathConfig,
    GroupCommitConfig,
    SnapshotterConfig,
    containerd_snippet,
    default_config_text,
    load_config,
    parse_config,
    parse_host_port,
    probe_capabilities,
    snapshotter_capabilities,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def test_defaults() -> None:
    c = load_config()
    assert (c.root, c.address, c.backend) == (DEFAULT_ROOT, DEFAULT_ADDRESS, "native")
    assert (c.root, c.address) == (
        Path("/var/lib/stratasnap"),
        Path("/run/stratasnap/stratasnap.sock"),
    )
    assert c.snapshotters == (SnapshotterConfig("stratasnap", "native", DEFAULT_ROOT),)
    assert (c.log_level, c.metrics_address, c.socket_group) == ("info", "", "")
    assert c.shutdown_timeout == 30.0
    assert c.group_commit == GroupCommitConfig(enabled=True, max_batch=64)
    assert c.group_commit.batch_limit == 64
    assert Config() == Config(snapshotters=c.snapshotters)


def test_default_config_text_is_the_defaults() -> None:
    text = default_config_text()
    assert parse_config(text) == load_config()
    # Every key is explained, and the several-snapshotters example is valid once uncommented.
    for key in ("root", "address", "backend", "log_level", "metrics_address", "socket_group"):
        assert f"\n{key} = " in text
    assert "\n[group_commit]\nenabled = true\nmax_batch = 64\n" in text
    start = text.index("# [snapshotters.stratasnap]")
    example = "\n".join(line.removeprefix("#").strip() for line in text[start:].splitlines())
    several = parse_config(example)
    assert [(s.name, s.backend, s.root) for s in several.snapshotters] == [
        ("stratasnap", "native", DEFAULT_ROOT / "stratasnap"),
        ("stratasnap-overlay", "overlay", Path("/var/lib/stratasnap/overlay")),
    ]


def test_fast_path_table() -> None:
    assert load_config().fast_path == FastPathConfig(
        True, Path("/run/containerd/containerd.sock"), 300.0, 1.0
    )
    c = parse_config(
        "[fast_path]\nenabled = false\ncontainerd_address = '/run/c.sock'\n"
        "fetch_timeout = 5\nfetch_start_timeout = 0.5\n"
    )
    assert c.fast_path == FastPathConfig(False, Path("/run/c.sock"), 5.0, 0.5)
    assert "\n[fast_path]\nenabled = true\n" in default_config_text()


def test_full_file(scratch: Path) -> None:
    f = scratch / "c.toml"
    f.write_text(
        """
version = 1
root = "/srv/snap"
address = "/run/x/s.sock"
backend = "native"
log_level = "DEBUG"
metrics_address = "[::1]:9411"
socket_group = 1000
shutdown_timeout = 5

[group_commit]
enabled = false
max_batch = 8

[snapshotters.fast]
backend = "native"
options = { }

[snapshotters.big]
root = "/data/big"
options = { size = "10G", reflink = true }
"""
    )
    c = load_config(f)
    assert c.source == f
    assert (c.root, c.address, c.log_level) == (Path("/srv/snap"), Path("/run/x/s.sock"), "debug")
    assert (c.metrics_address, c.socket_group, c.shutdown_timeout) == ("[::1]:9411", "1000", 5.0)
    assert c.group_commit == GroupCommitConfig(enabled=False, max_batch=8)
    assert c.group_commit.batch_limit == 1  # disabled: every write commits alone
    fast, big = c.snapshotters
    assert fast == SnapshotterConfig("fast", "native", Path("/srv/snap/fast"))
    assert (big.name, big.root, dict(big.options)) == (
        "big",
        Path("/data/big"),
        {"size": "10G", "reflink": True},
    )
    assert c.names == ("fast", "big") and c.snapshotter("big") is big
    with pytest.raises(KeyError):
        c.snapshotter("nope")
    with pytest.raises(TypeError):
        big.options["x"] = 1  # type: ignore[index]


def test_single_named_snapshotter_uses_root() -> None:
    c = parse_config('root = "/r"\n[snapshotters.mine]\nbackend = "overlay"\n')
    assert c.snapshotters == (SnapshotterConfig("mine", "overlay", Path("/r")),)


def test_flags_override_the_file(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = scratch / "c.toml"
    f.write_text('root = "/from/file"\nlog_level = "error"\n[snapshotters.a]\n[snapshotters.b]\n')
    monkeypatch.chdir(scratch)
    c = load_config(f, root="rel/root", address="s.sock", log_level="warn", backend="overlay")
    assert c.root == scratch / "rel" / "root"  # relative flags: from the current directory
    assert c.address == scratch / "s.sock"
    assert c.log_level == "warning"
    # Derived values follow the overrides.
    assert [(s.backend, s.root) for s in c.snapshotters] == [
        ("overlay", scratch / "rel/root/a"),
        ("overlay", scratch / "rel/root/b"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('rooot = "/x"', "config: rooot: unknown key (known: version, root,"),
        ("version = 2", "config: version: unsupported version 2"),
        ('root = "relative"', "config: root: 'relative' is not an absolute path"),
        ("root = 3", "config: root: expected a path, got 3"),
        ('address = "/' + "a" * 120 + '"', "config: address: "),
        ('backend = ""', "config: backend: must not be empty"),
        ("backend = 1", "config: backend: expected a string, got 1"),
        ('log_level = "loud"', "config: log_level: 'loud' is not one of debug, info"),
        ('metrics_address = "localhost"', "config: metrics_address: 'localhost' is not host:port"),
        ('metrics_address = "::1:80"', "config: metrics_address: '::1:80': write an IPv6 host"),
        ('metrics_address = "h:99999"', "config: metrics_address: 'h:99999' is not host:port"),
        ("socket_group = [1]", "config: socket_group: expected a group name or number"),
        ("shutdown_timeout = -1", "config: shutdown_timeout: expected a number of seconds >= 0"),
        ("shutdown_timeout = true", "config: shutdown_timeout: expected a number of seconds"),
        ('snapshotters = "x"', "config: snapshotters: expected tables [snapshotters.NAME]"),
        ("group_commit = true", "config: group_commit: expected a table [group_commit]"),
        ("[group_commit]\nsize = 3", "config: group_commit.size: unknown key (known: enabled"),
        ('[group_commit]\nenabled = "no"', "config: group_commit.enabled: expected true or false"),
        ("[group_commit]\nmax_batch = 0", "config: group_commit.max_batch: expected a number of"),
        ("[group_commit]\nmax_batch = 1025", "config: group_commit.max_batch: expected a number"),
        ("[group_commit]\nmax_batch = 2.5", "config: group_commit.max_batch: expected a number"),
        ("[group_commit]\nmax_batch = true", "config: group_commit.max_batch: expected a number"),
        ("[snapshotters.'a.b']", "config: snapshotters.a.b: a name may only hold letters"),
        ("[snapshotters.a]\nbackend = 2", "config: snapshotters.a.backend: expected a string"),
        ("[snapshotters.a]\nroot = 'x'", "config: snapshotters.a.root: 'x' is not an absolute"),
        ("[snapshotters.a]\nopts = {}", "config: snapshotters.a.opts: unknown key (known: backend"),
        ("[snapshotters.a]\noptions = 3", "config: snapshotters.a.options: expected a table"),
        ("snapshotters = { a = 3 }", "config: snapshotters.a: expected a table"),
        (
            "[snapshotters.a]\nroot = '/x'\n[snapshotters.b]\nroot = '/x'",
            "config: snapshotters.b.root: '/x' is also the root of snapshotter 'a'",
        ),
        ("root = ", "config: not valid TOML: "),
        ("fast_path = 1", "config: fast_path: expected a table [fast_path]"),
        ("[fast_path]\nwait = 1", "config: fast_path.wait: unknown key (known: enabled,"),
        ("[fast_path]\nenabled = 'yes'", "config: fast_path.enabled: expected true or false"),
        ("[fast_path]\ncontainerd_address = 'c.sock'", "config: fast_path.containerd_address:"),
        ("[fast_path]\nfetch_timeout = -2", "config: fast_path.fetch_timeout: expected a number"),
        ("[fast_path]\nfetch_start_timeout = 'x'", "config: fast_path.fetch_start_timeout: "),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert str(e.value).startswith(message)


def test_errors_name_the_file(scratch: Path) -> None:
    f = scratch / "c.toml"
    f.write_text("log_level = 3\n")
    with pytest.raises(ConfigError, match=rf"^config {f}: log_level: expected a string"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"cannot read config .*missing\.toml"):
        load_config(scratch / "missing.toml")


def test_host_port() -> None:
    assert parse_host_port("127.0.0.1:9411") == ("127.0.0.1", 9411)
    assert parse_host_port(":80") == ("", 80)
    assert parse_host_port("[::1]:0") == ("::1", 0)
    with pytest.raises(ValueError):
        parse_host_port("9411")


def test_containerd_snippet_single() -> None:
    c = load_config(root="/var/lib/stratasnap", address="/run/stratasnap/stratasnap.sock")
    text = containerd_snippet(c)
    plugin = tomllib.loads(text)["proxy_plugins"]["stratasnap"]
    assert plugin == {
        "type": "snapshot",
        "address": "/run/stratasnap/stratasnap.sock",
        "capabilities": [],  # native supports neither rebase nor remap-ids
        "exports": {"root": "/var/lib/stratasnap"},
    }
    assert "ctr --snapshotter stratasnap" in text
    # No bare [proxy_plugins] header: the block can be appended to a config that has one.
    assert "\n[proxy_plugins]\n" not in text
    appended = '[proxy_plugins]\n  [proxy_plugins.other]\n  type = "snapshot"\n' + text
    assert set(tomllib.loads(appended)["proxy_plugins"]) == {"other", "stratasnap"}


def test_containerd_snippet_several_and_capabilities() -> None:
    c = parse_config(
        'address = "/run/s.sock"\nroot = "/r"\n'
        '[snapshotters.a]\n[snapshotters.b]\nroot = "/elsewhere"\n'
    )
    text = containerd_snippet(c, capabilities={"b": ["rebase", "remap-ids"]})
    plugins = tomllib.loads(text)["proxy_plugins"]
    assert plugins["a"]["exports"] == {"root": "/r/a"}
    assert plugins["b"]["exports"] == {"root": "/elsewhere"}
    assert plugins["a"]["address"] == plugins["b"]["address"] == "/run/s.sock"
    assert plugins["a"]["capabilities"] == []
    assert plugins["b"]["capabilities"] == ["rebase", "remap-ids"]


def test_capabilities_come_from_the_backend() -> None:
    class Rebasing:
        capabilities = ("rebase",)

    class Dynamic:
        def capabilities(self) -> list[str]:
            return ["remap-ids"]

    assert snapshotter_capabilities(Rebasing) == ("rebase",)
    assert snapshotter_capabilities(Dynamic()) == ("remap-ids",)
    assert snapshotter_capabilities(object()) == ()
    assert probe_capabilities(SnapshotterConfig("x", "native")) == ()
    with pytest.raises(ConfigError, match=r"snapshotters\.x: unknown backend 'no-such-backend'"):
        probe_capabilities(SnapshotterConfig("x", "no-such-backend"))


@pytest.mark.parametrize(
    ("backend", "options", "named"),
    [
        ("overlay", {"sync_remove": "maybe"}, "sync_remove='maybe'"),
        ("overlay", {"bogus": "1"}, "unknown option(s) bogus for backend 'overlay'"),
        ("native", {"slow_chown": "true"}, "unknown option(s) slow_chown for backend 'native'"),
        ("blockfile", {"scratch_size": "lots"}, "scratch_size"),
        ("blockfile", {"sync_remove": "true"}, "unknown option(s) sync_remove"),
        ("btrfs", {"quota": "maybe"}, "quota='maybe'"),
        (
            "btrfs",
            {"upperdir_label": "true"},
            "unknown option(s) upperdir_label for backend 'btrfs'",
        ),
    ],
)
def test_config_containerd_reports_a_bad_backend_option(
    backend: str, options: dict[str, str], named: str
) -> None:
    """The snippet must not claim capabilities for options the server would refuse."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        probe_capabilities(SnapshotterConfig("s", backend, options=options))
    args = ["--backend", backend]
    for key, value in options.items():
        args += ["-o", f"{key}={value}"]
    done = CliRunner().invoke(cli, [*args, "config", "containerd"])
    assert done.exit_code == 2, done.output
    assert named in done.output and "capabilities" not in done.output


def _module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stratasnap.server", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


def test_module_prints_configs(scratch: Path) -> None:
    default = _module("config", "default")
    assert default.returncode == 0 and default.stdout == default_config_text()
    snippet = _module("config", "containerd", "--root", str(scratch), "--address", "/run/a.sock")
    assert snippet.returncode == 0
    plugin = tomllib.loads(snippet.stdout)["proxy_plugins"]["stratasnap"]
    assert plugin["exports"]["root"] == str(scratch) and plugin["address"] == "/run/a.sock"
    bad = _module("config", "containerd", "--root", "/r", "--address", "/" + "x" * 200)
    assert bad.returncode == 2 and "address" in bad.stderr
