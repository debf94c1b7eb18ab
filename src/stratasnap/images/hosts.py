"""Where to reach a registry: mirrors from containerd's ``hosts.toml``.

containerd's format (``<hosts-dir>/<registry>/hosts.toml``, ``_default/`` for any
registry without its own directory)::

    server = "https://registry.example"          # the upstream (default: https://<registry>)
    [host."http://mirror.local:5000"]              # tried first, in file order
      capabilities = ["pull", "resolve"]           # resolve: may answer tags
      skip_verify = true                           # no TLS verification
      ca = "/etc/certs/mirror.pem"
      override_path = false                        # true: the URL already ends in the API path
      [host."http://mirror.local:5000".header]
        X-Custom = "value"

Credentials are :mod:`.credentials`' business.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgument

__all__ = ["RegistryHost", "hosts_for"]


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint that serves (part of) the distribution API for a registry."""

    scheme: str
    host: str
    path: str = "/v2"
    capabilities: tuple[str, ...] = ("pull", "resolve", "push")
    skip_verify: bool = False
    ca: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"


def _host_from_url(url: str, default_scheme: str) -> tuple[str, str, str]:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = default_scheme, url
    host, _, path = rest.partition("/")
    return scheme, host, "/" + path.rstrip("/") if path else ""


def hosts_for(
    registry: str, api_host: str, hosts_dir: str | Path | None = None, plain_http: bool = False
) -> list[RegistryHost]:
    """The endpoints to try for ``registry``, mirrors first, the upstream last."""
    scheme = "http" if plain_http else "https"
    upstream = RegistryHost(scheme, api_host)
    if hosts_dir is None:
        return [upstream]
    base = Path(hosts_dir)
    path = base / registry / "hosts.toml"
    if not path.is_file():
        path = base / "_default" / "hosts.toml"
    if not path.is_file():
        return [upstream]
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"{path}: {exc}") from None
    out: list[RegistryHost] = []
    for url, cfg in (doc.get("host") or {}).items():
        out.append(_endpoint(url, cfg, scheme, path))
    server = doc.get("server")
    if server:
        out.append(_endpoint(str(server), doc, scheme, path, upstream=True))
    else:
        out.append(upstream)
    return out


def _endpoint(
    url: str, cfg: dict[str, object], scheme: str, where: Path, upstream: bool = False
) -> RegistryHost:
    s, host, path = _host_from_url(url, scheme)
    if s not in ("http", "https") or not host:
        raise InvalidArgument(f"{where}: host {url!r} is not an http(s) URL")
    if not cfg.get("override_path"):
        path = path + "/v2"
    caps = cfg.get("capabilities", ["pull", "resolve", "push"] if upstream else ["pull"])
    if not isinstance(caps, list):
        raise InvalidArgument(f"{where}: capabilities of {url!r} must be a list")
    ca = cfg.get("ca", "")
    headers = cfg.get("header") or {}
    assert isinstance(headers, dict)
    return RegistryHost(
        scheme=s,
        host=host,
        path=path,
        capabilities=tuple(str(c) for c in caps),
        skip_verify=bool(cfg.get("skip_verify", False)),
        ca=str(ca[0] if isinstance(ca, list) and ca else ca or ""),
        headers={str(k): str(v[0] if isinstance(v, list) else v) for k, v in headers.items()},
    )
