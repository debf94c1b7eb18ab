"""The click verbs ``serve`` and ``config``, as the ``stratasnap`` group will wire them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from stratasnap.server.commands import config, serve
from stratasnap.server.config import ConfigError, default_config_text, load_config
from stratasnap.server.daemon import Server


@click.group()
@click.option("--root", type=click.Path(path_type=Path), envvar="STRATASNAP_ROOT")
@click.option("--backend", default="native", envvar="STRATASNAP_BACKEND")
@click.option(
    "--option",
    "-o",
    "options",
    multiple=True,
    callback=lambda ctx, param, values: dict(v.split("=", 1) for v in values),
)
def main(root: Path | None, backend: str, options: dict[str, str]) -> None:
    """Stands for stratasnap's main group (same global options)."""


main.add_command(serve)
main.add_command(config)


def run(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def plugin(result: click.testing.Result, name: str = "stratasnap") -> dict[str, object]:
    assert result.exit_code == 0, result.output
    found: dict[str, object] = tomllib.loads(result.output)["proxy_plugins"][name]
    return found


def test_config_default() -> None:
    result = run("config", "default")
    assert result.exit_code == 0 and result.output == default_config_text()


def test_config_containerd_takes_root_from_every_level(scratch: Path) -> None:
    assert plugin(run("config", "containerd"))["exports"] == {"root": "/var/lib/stratasnap"}
    got = plugin(run("--root", "/from/group", "config", "containerd"))
    assert got["exports"] == {"root": "/from/group"}
    got = plugin(run("--root", "/from/group", "config", "containerd", "--root", "/from/verb"))
    assert got["exports"] == {"root": "/from/verb"}
    got = plugin(run("config", "containerd", env={"STRATASNAP_ROOT": "/from/env"}))
    assert got["exports"] == {"root": "/from/env"}
    file = scratch / "c.toml"
    file.write_text('root = "/from/file"\naddress = "/run/f.sock"\n')
    got = plugin(run("config", "containerd", "-c", str(file)))
    assert got == {
        "type": "snapshot",
        "address": "/run/f.sock",
        "capabilities": [],
        "exports": {"root": "/from/file"},
    }
    got = plugin(run("--root", "/from/group", "config", "containerd", "-c", str(file)))
    assert got["exports"] == {"root": "/from/group"}


def test_bad_config_exits_2_with_one_line(scratch: Path) -> None:
    file = scratch / "c.toml"
    file.write_text("metrics_address = 80\n")
    for verb in ("serve", "config containerd"):
        result = CliRunner().invoke(main, [*verb.split(), "--config", str(file)])
        assert result.exit_code == 2
        assert result.output == (
            f"stratasnap: config {file}: metrics_address: expected a string, got 80\n"
        )


def test_serve_that_cannot_start_exits_1(scratch: Path) -> None:
    with Server(load_config(root=scratch / "root", address=scratch / "a.sock")):
        result = CliRunner().invoke(
            main, ["serve", "--root", str(scratch / "root"), "--address", str(scratch / "b.sock")]
        )
    assert result.exit_code == 1
    assert result.output.startswith("stratasnap: another stratasnap server (pid ")


def test_backend_options_from_the_command_line(scratch: Path) -> None:
    assert dict(load_config(options={"size": "1G"}).snapshotters[0].options) == {"size": "1G"}
    file = scratch / "c.toml"
    file.write_text("[snapshotters.a]\noptions = { x = 1 }\n")
    assert dict(load_config(file, options={"y": "2"}).snapshotters[0].options) == {
        "x": 1,
        "y": "2",
    }
    file.write_text("[snapshotters.a]\n[snapshotters.b]\n")
    with pytest.raises(ConfigError, match="need a single snapshotter"):
        load_config(file, options={"y": "2"})
    # The group's -o reaches the backend (which refuses an option it does not know).
    args = ["-o", "bogus=1", "serve", "--root", str(scratch / "r"), "--address", str(scratch / "s")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "cannot open backend 'native'" in result.output and "bogus" in result.output
