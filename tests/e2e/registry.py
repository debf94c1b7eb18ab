"""A private registry for tests and benchmarks (no pytest here).

:class:`LocalRegistry` runs Debian's ``docker-registry`` (distribution 2.x) on
127.0.0.1 with a config it writes (filesystem storage under its own base
directory, optional htpasswd auth) and stops it by PID. :func:`push` copies an
OCI layout into it with ``skopeo``. :class:`AuthProxy` stands in front of a
registry to test what a plain registry cannot: bearer-token auth with a token
service, redirected blob downloads, dropped connections and 5xx answers.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

__all__ = ["AuthProxy", "LocalRegistry", "free_port", "push"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRegistry:
    """``docker-registry serve`` on 127.0.0.1:<free port>; ``users`` turns on htpasswd auth."""

    def __init__(self, base: Path, users: dict[str, str] | None = None) -> None:
        self.base = base
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {
                "filesystem": {"rootdirectory": str(base / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.address, "secret": "test-secret"},
        }
        if users:
            htpasswd = base / "htpasswd"
            for i, (user, password) in enumerate(users.items()):
                subprocess.run(
                    ["htpasswd", "-B", "-b", *([] if i else ["-c"]), str(htpasswd), user, password],
                    check=True,
                    capture_output=True,
                )
            config["auth"] = {"htpasswd": {"realm": "test", "path": str(htpasswd)}}
        # JSON is YAML: no YAML library needed.
        (base / "config.yml").write_text(json.dumps(config))
        self.log = open(base / "registry.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(base / "config.yml")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        "docker-registry did not start: "
                        + (base / "registry.log").read_text(errors="replace")[-2000:]
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def push(layout: Path, dest: str, creds: str = "", all_platforms: bool = False) -> None:
    """Copy the OCI layout directory ``layout`` (its only image) to ``dest`` (host/repo:tag)."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise RuntimeError("skopeo is not installed")
    cmd = [skopeo, "copy", "--quiet", "--dest-tls-verify=false"]
    if creds:
        cmd += ["--dest-creds", creds]
    if all_platforms:
        cmd += ["--all"]
    cmd += [f"oci:{layout}", f"docker://{dest}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"skopeo copy failed: {r.stderr}")


class AuthProxy:
    """A bearer-token front for ``upstream`` (host:port), with faults on demand.

    ``/token`` hands out tokens for ``users`` (Basic auth); every ``/v2/``
    request needs one. Blob GETs are redirected to ``/storage/…`` (served
    without auth, like object storage). ``fail_next_5xx`` answers that many
    requests with 503; ``drop_blob_after`` cuts the first blob body after that
    many bytes. ``requests`` records (method, path, Range) of what came in.
    """

    def __init__(
        self, upstream: str, users: dict[str, str], refresh_tokens: tuple[str, ...] = ()
    ) -> None:
        self.upstream = upstream
        self.users = users
        #: Identity tokens the token endpoint trades by OAuth2 POST (grant_type=refresh_token).
        self.refresh_tokens = set(refresh_tokens)
        self.tokens: set[str] = set()
        self.fail_next_5xx = 0
        self.drop_blob_after: int | None = None
        #: Send blob bodies at about this many bytes per second (0: full speed).
        self.blob_rate = 0
        self.requests: list[tuple[str, str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self, "GET")

            def do_HEAD(self) -> None:
                proxy._handle(self, "HEAD")

            def do_POST(self) -> None:
                proxy._token_by_post(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _reply(
        self,
        h: http.server.BaseHTTPRequestHandler,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _token_by_post(self, h: http.server.BaseHTTPRequestHandler) -> None:
        """The OAuth2 form of the token endpoint: a refresh token for an access token."""
        length = int(h.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(h.rfile.read(length).decode())
        self.requests.append(("POST", h.path, ""))
        grant = form.get("grant_type", [""])[0]
        refresh = form.get("refresh_token", [""])[0]
        if (
            h.path.startswith("/token")
            and grant == "refresh_token"
            and refresh in self.refresh_tokens
        ):
            token = secrets.token_hex(16)
            self.tokens.add(token)
            self._reply(h, 200, json.dumps({"access_token": token}).encode())
            return
        self._reply(h, 401, b'{"error":"invalid_grant"}')

    def _handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        path = h.path
        self.requests.append((method, path, h.headers.get("Range", "")))
        if self.fail_next_5xx > 0:
            self.fail_next_5xx -= 1
            self._reply(h, 503, b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}')
            return
        if path.startswith("/token"):
            auth = h.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                if self.users.get(user) == pw:
                    token = secrets.token_hex(16)
                    self.tokens.add(token)
                    self._reply(h, 200, json.dumps({"token": token}).encode())
                    return
            self._reply(h, 401, b'{"details":"bad credentials"}')
            return
        if path.startswith("/storage/"):
            self._forward(h, method, path[len("/storage") :], h.headers.get("Range"))
            return
        auth = h.headers.get("Authorization", "")
        if not (auth.startswith("Bearer ") and auth[7:] in self.tokens):
            repo = path.split("/")[2] if path.count("/") > 2 else ""
            realm = f"http://{self.address}/token"
            self._reply(
                h,
                401,
                b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                {
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="test",'
                    f'scope="repository:{repo}:pull"'
                },
            )
            return
        if "/blobs/" in path and method == "GET":
            self._reply(h, 307, headers={"Location": f"/storage{path}"})
            return
        self._forward(h, method, path, h.headers.get("Range"))

    def _forward(
        self, h: http.server.BaseHTTPRequestHandler, method: str, path: str, rng: str | None
    ) -> None:
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        headers = {"Accept": h.headers.get("Accept", "*/*")}
        if rng:
            headers["Range"] = rng
        conn.request(method, urllib.parse.quote(path, safe="/:?=&@+"), headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        drop = self.drop_blob_after
        if drop is not None and "/blobs/" in path and len(body) > drop:
            self.drop_blob_after = None
            h.send_response(resp.status)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[:drop])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        keep = {"Content-Type", "Docker-Content-Digest", "Content-Range", "Accept-Ranges"}
        if self.blob_rate and "/blobs/" in path and method == "GET":
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k in keep:
                    h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            step = max(self.blob_rate // 20, 1)
            try:
                for off in range(0, len(body), step):
                    h.wfile.write(body[off : off + step])
                    h.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                h.close_connection = True
            return
        self._reply(
            h,
            resp.status,
            body if method != "HEAD" else b"",
            {k: v for k, v in resp.getheaders() if k in keep},
        )
