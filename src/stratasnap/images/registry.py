"""A client of the OCI distribution API: manifests, blobs, auth, redirects, retries, mirrors.

Plain ``http.client`` (one kept-alive connection per endpoint). Auth follows
the registry's ``WWW-Authenticate`` challenge: ``Bearer`` (a token from the
realm it names, asked with the credentials when there are any; an identity
token from a credential helper is traded for one by an OAuth2 POST) or
``Basic``. Redirects (blob downloads are often sent to object storage) are
followed without the registry's Authorization header. Connection failures,
429 and 5xx answers are retried with back-off; a blob download that breaks
off resumes with a Range request where the content store kept its bytes.
Mirrors from ``hosts.toml`` are tried in order before the upstream.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import FailedPrecondition, InvalidArgument, NotFound, SnapshotError, Unavailable
from .content import ContentStore, DigestMismatch
from .credentials import Credentials
from .hosts import RegistryHost
from .manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Descriptor
from .reference import Digest, Reference

__all__ = ["Registry", "RegistryError"]

_ACCEPT = ", ".join(
    [
        OCI_INDEX,
        DOCKER_LIST,
        OCI_MANIFEST,
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.1",
    ]
)
_MAX_MANIFEST = 4 << 20
_CHUNK = 1 << 20
_USER_AGENT = "stratasnap"
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(Unavailable):
    """The registry could not be reached, or answered with an error."""


@dataclass
class _Url:
    scheme: str
    host: str
    path: str  # with query

    @staticmethod
    def parse(url: str) -> _Url:
        u = urllib.parse.urlsplit(url)
        return _Url(u.scheme, u.netloc, (u.path or "/") + (f"?{u.query}" if u.query else ""))


class Registry:
    """Talks to one repository of one registry, through its endpoints (mirrors first)."""

    def __init__(
        self,
        ref: Reference,
        hosts: list[RegistryHost],
        credentials: Credentials | None = None,
        retries: int = 4,
        timeout: float = 60.0,
    ) -> None:
        self.ref = ref
        self.hosts = hosts
        self.credentials = credentials
        self.retries = retries
        self.timeout = timeout
        # One connection per endpoint per thread: layers download in parallel.
        self._local = threading.local()
        self._all_conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._auth: dict[str, str] = {}  # endpoint host -> Authorization value

    @property
    def _conns(self) -> dict[tuple[str, str], http.client.HTTPConnection]:
        conns: dict[tuple[str, str], http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None
        )
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def close(self) -> None:
        with self._lock:
            for conn in self._all_conns:
                conn.close()
            self._all_conns.clear()

    # -- HTTP plumbing -------------------------------------------------------------

    def _conn(self, url: _Url, host: RegistryHost | None) -> http.client.HTTPConnection:
        key = (url.scheme, url.host)
        conn = self._conns.get(key)
        if conn is None:
            if url.scheme == "https":
                ctx = ssl.create_default_context(cafile=host.ca or None if host else None)
                if host and host.skip_verify:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                conn = http.client.HTTPSConnection(url.host, timeout=self.timeout, context=ctx)
            else:
                conn = http.client.HTTPConnection(url.host, timeout=self.timeout)
            self._conns[key] = conn
            with self._lock:
                self._all_conns.append(conn)
        return conn

    def _drop(self, url: _Url) -> None:
        conn = self._conns.pop((url.scheme, url.host), None)
        if conn is not None:
            conn.close()

    def _send(
        self,
        method: str,
        url: _Url,
        headers: dict[str, str],
        host: RegistryHost | None,
        body: bytes | None = None,
    ) -> http.client.HTTPResponse:
        """One request with retries on dropped connections, 429 and 5xx."""
        last: str = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(min(0.25 * 2**attempt, 4.0))
            conn = self._conn(url, host)
            try:
                conn.request(
                    method, url.path, body=body, headers={"User-Agent": _USER_AGENT, **headers}
                )
                resp = conn.getresponse()
            except ssl.SSLError as exc:
                self._drop(url)
                raise RegistryError(
                    f"registry {url.host}: TLS failed ({exc.reason or exc}); if it serves "
                    "plain HTTP, use --plain-http (or an http:// host in hosts.toml)"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop(url)
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status == 429 or resp.status >= 500:
                last = f"HTTP {resp.status} {resp.reason}"
                resp.read()
                continue
            return resp
        raise RegistryError(
            f"registry {url.host}: {method} {url.path.split('?')[0]} failed after "
            f"{self.retries} attempts: {last}"
        )

    def _request(
        self,
        method: str,
        host: RegistryHost,
        path: str,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        """A request to an API path, with auth challenges answered and redirects followed."""
        url = _Url(host.scheme, host.host, f"{host.path}/{self.ref.repository}/{path}")
        hdrs = {**host.headers, **(headers or {})}
        authed = False
        for _ in range(6):
            send = dict(hdrs)
            same_host = url.host == host.host
            if same_host and host.host in self._auth:
                send["Authorization"] = self._auth[host.host]
            resp = self._send(method, url, send, host if same_host else None)
            if resp.status == 401 and same_host and not authed:
                challenge = resp.getheader("WWW-Authenticate", "")
                resp.read()
                self._authenticate(host, challenge)
                authed = True
                continue
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location", "")
                resp.read()
                if not location:
                    raise RegistryError(f"registry {url.host}: redirect without a Location")
                target = urllib.parse.urljoin(f"{url.scheme}://{url.host}{url.path}", location)
                url = _Url.parse(target)
                continue
            return resp
        raise RegistryError(f"registry {host.host}: too many redirects or auth rounds for {path}")

    def _authenticate(self, host: RegistryHost, challenge: str) -> None:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        creds = self.credentials
        if scheme.lower() == "basic":
            if creds is None or (creds.identity_token and not creds.username):
                raise self._login_hint(host)
            self._auth[host.host] = f"Basic {_basic(creds)}"
            return
        if scheme.lower() != "bearer" or "realm" not in params:
            raise FailedPrecondition(
                f"registry {host.host}: unsupported authentication challenge {challenge!r}"
            )
        query = {"service": params.get("service", "")}
        scope = params.get("scope") or f"repository:{self.ref.repository}:pull"
        query["scope"] = scope
        if creds is not None and creds.identity_token:
            # An identity token is an OAuth2 refresh token: it is traded at the
            # realm by POST (docker's token spec), never sent as a password.
            form = {**query, "grant_type": "refresh_token", "client_id": "stratasnap"}
            form["refresh_token"] = creds.identity_token
            resp = self._send(
                "POST",
                _Url.parse(params["realm"]),
                {"Content-Type": "application/x-www-form-urlencoded"},
                host,
                body=urllib.parse.urlencode(form).encode(),
            )
        else:
            url = _Url.parse(params["realm"] + "?" + urllib.parse.urlencode(query))
            headers = {}
            if creds is not None:
                headers["Authorization"] = f"Basic {_basic(creds)}"
            resp = self._send("GET", url, headers, host)
        body = resp.read()
        if resp.status == 401:
            raise self._login_hint(host, rejected=creds is not None)
        if resp.status != 200:
            raise RegistryError(
                f"registry {host.host}: token service {url.host} answered HTTP {resp.status}"
            )
        token: str | None
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise RegistryError(f"registry {host.host}: token service gave no token")
        self._auth[host.host] = f"Bearer {token}"

    def _login_hint(self, host: RegistryHost, rejected: bool = False) -> FailedPrecondition:
        what = "rejected the credentials" if rejected else "needs credentials"
        return FailedPrecondition(
            f"registry {host.host} {what} for {self.ref.repository} (HTTP 401): "
            "pass --user USER:PASSWORD, or log in with `docker login "
            f"{self.ref.registry}` so that ~/.docker/config.json holds them"
        )

    def _status_error(
        self, resp: http.client.HTTPResponse, host: RegistryHost, what: str
    ) -> SnapshotError:
        body = resp.read(4096).decode(errors="replace")
        detail = body
        try:
            errs = json.loads(body).get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs) or body
        except (ValueError, AttributeError):
            pass
        text = f"registry {host.host}: {what}: HTTP {resp.status} {resp.reason}: {detail.strip()}"
        if resp.status == 404:
            return NotFound(text)
        if resp.status == 401:
            return self._login_hint(host, rejected=self.credentials is not None)
        if resp.status in (400, 403):
            return FailedPrecondition(text)
        return RegistryError(text)

    def _each_host(self, capability: str) -> list[RegistryHost]:
        hosts = [h for h in self.hosts if capability in h.capabilities]
        if not hosts:
            raise InvalidArgument(f"no endpoint of {self.ref.registry} can {capability}")
        return hosts

    # -- API -------------------------------------------------------------------------

    def manifest(self, obj: str) -> tuple[bytes, str, Digest]:
        """The manifest or index ``obj`` (a tag or a digest): bytes, media type, digest."""
        is_digest = obj.startswith("sha256:")
        errors: list[SnapshotError] = []
        for host in self._each_host("pull" if is_digest else "resolve"):
            try:
                resp = self._request("GET", host, f"manifests/{obj}", {"Accept": _ACCEPT})
            except RegistryError as exc:
                errors.append(exc)
                continue
            if resp.status != 200:
                sep = "@" if is_digest else ":"
                what = f"manifest {self.ref.repository}{sep}{obj}"
                errors.append(self._status_error(resp, host, what))
                continue
            data = resp.read(_MAX_MANIFEST + 1)
            if len(data) > _MAX_MANIFEST:
                raise InvalidArgument(f"registry {host.host}: manifest {obj} is too large")
            media = (resp.getheader("Content-Type") or "").split(";")[0].strip()
            digest = Digest.of(data)
            if is_digest and str(digest) != obj:
                raise DigestMismatch(f"registry {host.host}: manifest {obj} has digest {digest}")
            return data, media, digest
        raise _best(errors)

    def fetch_blob(
        self,
        desc: Descriptor,
        content: ContentStore,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Download blob ``desc`` into ``content`` (verified; resumed where a partial is kept)."""
        if content.has(desc.digest):
            if progress:
                progress(desc.size)
            return
        errors: list[SnapshotError] = []
        for host in self._each_host("pull"):
            try:
                self._fetch_from(host, desc, content, progress)
                return
            except (RegistryError, NotFound) as exc:
                errors.append(exc)
        raise _best(errors)

    def _fetch_from(
        self,
        host: RegistryHost,
        desc: Descriptor,
        content: ContentStore,
        progress: Callable[[int], None] | None,
    ) -> None:
        with content.writer(desc.digest, desc.size) as w:
            if w.already_stored:  # another pull stored it while this one waited
                if progress:
                    progress(desc.size)
                return
            if progress and w.offset:
                progress(w.offset)
            for attempt in range(self.retries):
                headers = {"Range": f"bytes={w.offset}-"} if w.offset else {}
                resp = self._request("GET", host, f"blobs/{desc.digest}", headers)
                if resp.status == 200 and w.offset:
                    if progress:
                        progress(-w.offset)
                    w.restart()  # the server ignored the Range: start over
                elif resp.status not in (200, 206):
                    what = f"blob {desc.digest} of {self.ref.repository}"
                    raise self._status_error(resp, host, what)
                try:
                    while chunk := resp.read(_CHUNK):
                        w.write(chunk)
                        if progress:
                            progress(len(chunk))
                except (TimeoutError, OSError, http.client.HTTPException):
                    self._drop(_Url(host.scheme, host.host, ""))
                    if attempt + 1 == self.retries:
                        raise RegistryError(
                            f"registry {host.host}: blob {desc.digest} download kept breaking "
                            f"off (at byte {w.offset} of {desc.size})"
                        ) from None
                    time.sleep(min(0.25 * 2 ** (attempt + 1), 4.0))
                    continue
                if w.offset >= desc.size:
                    return
                # Short body without an error: resume from where it stopped.
            raise RegistryError(f"registry {host.host}: blob {desc.digest} came back short")


def _basic(creds: Credentials) -> str:
    return base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def _best(errors: list[SnapshotError]) -> SnapshotError:
    """The most telling of several endpoints' errors (auth over not-found over network)."""
    for kind in (FailedPrecondition, DigestMismatch, NotFound):
        for e in errors:
            if isinstance(e, kind):
                return e
    return errors[-1] if errors else RegistryError("no registry endpoint answered")
