"""Credentials from --user and docker's config.json: helpers, stores, auths, in docker's order."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from stratasnap.errors import FailedPrecondition, InvalidArgument
from stratasnap.images import credentials
from stratasnap.images.credentials import Credentials, credentials_for


@pytest.fixture
def docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DOCKER_CONFIG dir and a PATH dir for helpers; returns the config dir."""
    conf = tmp_path / "docker"
    conf.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(conf))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return conf


def _config(conf: Path, doc: dict[str, object]) -> None:
    (conf / "config.json").write_text(json.dumps(doc))


def _helper(conf: Path, name: str, script: str) -> Path:
    """A real docker-credential-<name> program: a shell script speaking the protocol."""
    exe = conf.parent / "bin" / f"docker-credential-{name}"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return exe


# Answers only for the server it was asked about, and records what it was asked.
_STORE = """
[ "$1" = get ] || exit 3
read -r server
echo "$server" >> "$(dirname "$0")/asked"
case "$server" in
  r.example) echo '{"ServerURL":"r.example","Username":"alice","Secret":"pw-from-helper"}' ;;
  https://index.docker.io/v1/) echo '{"Username":"hubuser","Secret":"hubpw"}' ;;
  tok.example) echo '{"Username":"<token>","Secret":"refresh-123"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
"""


def test_no_config_means_no_credentials(docker: Path) -> None:
    assert credentials_for("r.example") is None


def test_user_option_wins_and_is_checked(docker: Path) -> None:
    _config(docker, {"auths": {"r.example": {"username": "n", "password": "w"}}})
    assert credentials_for("r.example", "x:y:z") == Credentials("x", "y:z")
    with pytest.raises(InvalidArgument, match="USER:PASSWORD"):
        credentials_for("r.example", "nocolon")


def test_auths_forms(docker: Path) -> None:
    auth = base64.b64encode(b"u:p:with:colons").decode()
    _config(
        docker,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": auth},
                "https://r.example/": {"username": "n", "password": "w"},
                "t.example": {"identitytoken": "idt"},
            }
        },
    )
    assert credentials_for("docker.io") == Credentials("u", "p:with:colons")
    assert credentials_for("r.example") == Credentials("n", "w")
    assert credentials_for("t.example") == Credentials("", "", "idt")
    assert credentials_for("other.example") is None


def test_bad_auth_field_names_the_file(docker: Path) -> None:
    _config(docker, {"auths": {"r.example": {"auth": "!!!"}}})
    with pytest.raises(InvalidArgument, match=r"config.json: auths.r.example.auth"):
        credentials_for("r.example")
    (docker / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"config\.json"):
        credentials_for("r.example")


def test_creds_store_is_asked_with_dockers_server_address(docker: Path) -> None:
    _helper(docker, "teststore", _STORE)
    # The store comes before auths: what `docker login` with a store left in auths
    # is an empty entry.
    _config(docker, {"credsStore": "teststore", "auths": {"r.example": {}}})
    assert credentials_for("r.example") == Credentials("alice", "pw-from-helper")
    assert credentials_for("docker.io") == Credentials("hubuser", "hubpw")
    assert credentials_for("tok.example") == Credentials("", "", "refresh-123")
    # Nothing stored for it: no credentials, as docker does.
    assert credentials_for("nothing.example") is None
    asked = (docker.parent / "bin" / "asked").read_text().split()
    assert asked == [
        "r.example",
        "https://index.docker.io/v1/",
        "tok.example",
        "nothing.example",
    ]


def test_cred_helpers_beat_the_store_per_registry(docker: Path) -> None:
    _helper(docker, "teststore", _STORE)
    _helper(docker, "special", 'read -r s; echo \'{"Username":"sp","Secret":"sp-pw"}\'\n')
    _config(
        docker,
        {
            "credsStore": "teststore",
            "credHelpers": {"r.example": "special"},
            "auths": {"r.example": {"username": "never", "password": "used"}},
        },
    )
    assert credentials_for("r.example") == Credentials("sp", "sp-pw")
    assert credentials_for("docker.io") == Credentials("hubuser", "hubpw")


def test_missing_helper_is_an_error_not_anonymous(docker: Path) -> None:
    _config(docker, {"credHelpers": {"r.example": "nosuch"}})
    with pytest.raises(FailedPrecondition, match="docker-credential-nosuch is not on PATH"):
        credentials_for("r.example")
    assert credentials_for("other.example") is None  # only r.example uses it


def test_failing_helper_says_what_it_said(docker: Path) -> None:
    _helper(docker, "broken", "echo 'keychain locked' >&2; exit 2\n")
    _config(docker, {"credsStore": "broken"})
    with pytest.raises(
        FailedPrecondition, match=r"broken failed for r.example \(exit 2\): keychain"
    ):
        credentials_for("r.example")


def test_garbage_answer_is_an_error(docker: Path) -> None:
    _helper(docker, "garbage", "read -r s; echo 'hello'\n")
    _config(docker, {"credsStore": "garbage"})
    with pytest.raises(FailedPrecondition, match="something other than"):
        credentials_for("r.example")


def test_hung_helper_times_out(docker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _helper(docker, "slow", "exec sleep 30\n")
    _config(docker, {"credsStore": "slow"})
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT", 0.5)
    with pytest.raises(FailedPrecondition, match="did not answer"):
        credentials_for("r.example")
