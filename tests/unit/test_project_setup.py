"""What a fresh machine gets from `make test` and `.ci/run`: pinned linters, random order."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]


def _extras_make_installs() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    found = re.search(r"pip install .*-e '\.\[([a-z,]+)\]'", makefile)
    assert found, "the Makefile no longer installs the package with extras"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    return [req for name in found.group(1).split(",") for req in extras[name]]


@pytest.mark.parametrize("tool", ["ruff", "mypy", "types-protobuf", "grpc-stubs"])
def test_linters_make_test_runs_first_are_pinned_exactly(tool: str) -> None:
    # `make test` runs ruff and mypy before any test: a new release of either (or of
    # the stubs mypy reads) must not turn a fresh checkout red.
    reqs = [r for r in _extras_make_installs() if re.match(rf"{re.escape(tool)}\b", r)]
    assert len(reqs) == 1 and re.fullmatch(rf"{re.escape(tool)}==[0-9][0-9a-z.]*", reqs[0]), reqs


def test_make_test_installs_random_order() -> None:
    assert any(r.startswith("pytest-randomly") for r in _extras_make_installs())


def test_ci_runs_in_random_order(pytestconfig: pytest.Config) -> None:
    active = pytestconfig.pluginmanager.hasplugin("randomly")
    if not IN_CI and not active:
        pytest.skip("random order turned off (-p no:randomly) outside CI")
    assert active, "CI must run the suite in random order (pytest-randomly)"


def test_ci_installs_what_make_needs_on_debian() -> None:
    # Debian 12's python3 has no ensurepip without python3-venv: `make` could not
    # create its venv.
    ci = (ROOT / ".ci" / "run").read_text()
    apt = re.search(r"apt-get install(?:[^\n\\]|\\\n)*", ci)
    assert apt is not None
    for package in ("python3-venv", "make", "util-linux", "e2fsprogs"):
        assert re.search(rf"\b{re.escape(package)}\b", apt.group(0)), package
