"""Registry credentials: ``--user``, or what ``docker login`` left in docker's config.

Docker's ``config.json`` (``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``) is read the way the docker CLI reads it, first
match wins:

1. ``credHelpers.<registry>``: a credential helper for that registry alone;
2. ``credsStore``: the helper for every registry (``docker login`` with a
   keychain, ``pass``, ``secretservice``, ``ecr-login``, ...);
3. ``auths.<registry>``: ``auth`` (base64 ``user:password``),
   ``username``/``password``, or ``identitytoken`` (an OAuth2 refresh token).

A helper is the program ``docker-credential-<name>`` on ``PATH``, run as
``docker-credential-<name> get`` with the server address on stdin; it prints
``{"Username": ..., "Secret": ...}``. The user name ``<token>`` means the
secret is an identity token, not a password. A helper that has nothing for
the registry (non-zero exit saying "credentials not found") means no
credentials, as in docker; any other failure is an error that names the
helper, because pulling anonymously instead would hide it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import FailedPrecondition, InvalidArgument
from .reference import DOCKER_HUB

__all__ = ["HELPER_TIMEOUT", "Credentials", "credentials_for", "docker_config_path"]

#: Seconds a credential helper may take (some ask a keychain or a cloud API).
HELPER_TIMEOUT = 30.0
#: The address docker stores Docker Hub credentials under.
_HUB_SERVER = "https://index.docker.io/v1/"
#: The user name helpers (and docker) use to mark an identity token.
_TOKEN_USER = "<token>"


@dataclass(frozen=True)
class Credentials:
    """What to authenticate with: a password, or an identity (refresh) token."""

    username: str
    password: str
    identity_token: str = ""


def docker_config_path() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) / "config.json" if env else Path.home() / ".docker" / "config.json"


def credentials_for(registry: str, user: str = "") -> Credentials | None:
    """Credentials for ``registry``: ``user`` (``USER:PASSWORD``) or docker's config."""
    if user:
        name, sep, password = user.partition(":")
        if not sep:
            raise InvalidArgument("--user takes USER:PASSWORD")
        return Credentials(name, password)
    path = docker_config_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path}: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{path}: not a JSON object")
    keys = _config_keys(registry)
    helpers = doc.get("credHelpers") or {}
    for key in keys:
        if isinstance(helpers, dict) and helpers.get(key):
            return _from_helper(str(helpers[key]), _server_address(registry), path)
    if doc.get("credsStore"):
        return _from_helper(str(doc["credsStore"]), _server_address(registry), path)
    return _from_auths(doc.get("auths") or {}, keys, path)


def _config_keys(registry: str) -> list[str]:
    """The names docker may have stored ``registry`` under, most specific first."""
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == DOCKER_HUB:
        keys += [_HUB_SERVER, "index.docker.io"]
    return keys


def _server_address(registry: str) -> str:
    # What `docker login` hands a helper to store, so what it must be asked for.
    return _HUB_SERVER if registry == DOCKER_HUB else registry


def _from_auths(auths: Mapping[str, object], keys: list[str], path: Path) -> Credentials | None:
    for key in keys:
        entry = auths.get(key) or auths.get(key + "/")
        if not isinstance(entry, dict) or not entry:
            continue
        if entry.get("identitytoken"):
            return Credentials(str(entry.get("username", "")), "", str(entry["identitytoken"]))
        if entry.get("auth"):
            try:
                plain = base64.b64decode(entry["auth"], validate=True).decode()
                name, _, password = plain.partition(":")
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument(
                    f"{path}: auths.{key}.auth is not base64 USER:PASSWORD"
                ) from None
            return Credentials(name, password)
        if entry.get("username"):
            return Credentials(str(entry["username"]), str(entry.get("password", "")))
    return None


def _from_helper(name: str, server: str, config: Path) -> Credentials | None:
    program = f"docker-credential-{name}"
    exe = shutil.which(program)
    if exe is None:
        raise FailedPrecondition(
            f"{config} names the credential helper {name!r}, but {program} is not on PATH: "
            "install it, or pass --user USER:PASSWORD"
        )
    try:
        done = subprocess.run(
            [exe, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(
            f"credential helper {program} did not answer for {server} within {HELPER_TIMEOUT:.0f} s"
        ) from None
    except OSError as exc:
        raise FailedPrecondition(f"credential helper {exe}: {exc.strerror}") from None
    said = (done.stdout or done.stderr).decode(errors="replace").strip()
    if done.returncode != 0:
        if "credentials not found" in said.lower():
            return None
        raise FailedPrecondition(
            f"credential helper {program} failed for {server} "
            f"(exit {done.returncode}): {said[:300]}"
        )
    try:
        answer = json.loads(done.stdout)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError):
        raise FailedPrecondition(
            f"credential helper {program} answered for {server} with something other "
            'than {"Username": ..., "Secret": ...}'
        ) from None
    if username == _TOKEN_USER:
        return Credentials("", "", secret)
    return Credentials(username, secret)
