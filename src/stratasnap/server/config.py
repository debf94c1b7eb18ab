"""The server's configuration: a TOML file, command-line overrides, and what containerd needs.

A minimal file is empty (every key has a default). A full one::

    version = 1
    root = "/var/lib/stratasnap"
    address = "/run/stratasnap/stratasnap.sock"
    backend = "native"
    log_level = "info"
    metrics_address = "127.0.0.1:9411"
    socket_group = ""
    shutdown_timeout = 30.0

    [fast_path]                          # containerd pulls that skip containerd's unpack
    enabled = true
    containerd_address = "/run/containerd/containerd.sock"
    fetch_timeout = 300.0
    fetch_start_timeout = 1.0

    [group_commit]                       # concurrent writes share SQLite commits
    enabled = true
    max_batch = 64

    [snapshotters.stratasnap]            # one proxy plugin per table
    backend = "native"
    root = "/var/lib/stratasnap"
    options = {}

Without ``[snapshotters.*]`` tables there is one snapshotter, named
``stratasnap``, with ``backend`` and ``root``. Each named snapshotter has its
own backend, root and backend options; with several, a snapshotter's root
defaults to ``<root>/<name>``, with one it defaults to ``root``. containerd
tells them apart by the ``snapshotter`` field of each request (the name of its
``[proxy_plugins.NAME]`` entry); with a single snapshotter every name maps to
it, with several an unknown name is NotFound and an empty one picks the first.

``[fast_path]`` is one table for the server, not per snapshotter: it names the
containerd whose content store the layers are read from, and a server serves
one containerd. Whether a snapshotter takes the fast path is its backend's
to say (it can convert a layer tar into a committed layer: erofs), so there
is nothing to choose per snapshotter.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..defaults import default_address, default_root
from ..group_commit import MAX_BATCH

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_BACKEND",
    "DEFAULT_NAME",
    "DEFAULT_ROOT",
    "LOG_LEVELS",
    "MAX_BATCH_LIMIT",
    "Config",
    "ConfigError",
    "FastPathConfig",
    "GroupCommitConfig",
    "SnapshotterConfig",
    "containerd_snippet",
    "default_config_text",
    "load_config",
    "parse_config",
    "parse_host_port",
    "snapshotter_capabilities",
]

# System paths as root, the user's XDG directories otherwise (stratasnap.defaults).
DEFAULT_ROOT = default_root()
DEFAULT_ADDRESS = default_address()
DEFAULT_BACKEND = "native"
DEFAULT_NAME = "stratasnap"
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: The largest ``group_commit.max_batch``: the first caller of a batch waits for
#: every operation in it, so a bigger one only adds to that caller's latency.
MAX_BATCH_LIMIT = 1024

#: Names become TOML bare keys (``[proxy_plugins.NAME]``) and directory names.
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
#: The longest path a unix socket address can have (``sun_path`` minus the NUL).
MAX_SOCKET_PATH = 107

_TOP_KEYS = (
    "version",
    "root",
    "address",
    "backend",
    "log_level",
    "metrics_address",
    "socket_group",
    "shutdown_timeout",
    "fast_path",
    "group_commit",
    "snapshotters",
)
_FAST_PATH_KEYS = ("enabled", "containerd_address", "fetch_timeout", "fetch_start_timeout")
_SNAPSHOTTER_KEYS = ("backend", "root", "options")
_GROUP_COMMIT_KEYS = ("enabled", "max_batch")

_Fail = Callable[[str, str], "ConfigError"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class SnapshotterConfig:
    """One snapshotter the server hands out: a backend on its own root."""

    name: str
    backend: str = DEFAULT_BACKEND
    root: Path = DEFAULT_ROOT
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


#: containerd's default socket (its content service is on it too).
DEFAULT_CONTAINERD_ADDRESS = Path("/run/containerd/containerd.sock")
#: Seconds a Prepare waits for containerd to finish fetching a layer's blob.
DEFAULT_FETCH_TIMEOUT = 300.0
#: Seconds a Prepare waits for a blob that nobody is fetching yet to start arriving.
DEFAULT_FETCH_START_TIMEOUT = 1.0


@dataclass(frozen=True)
class FastPathConfig:
    """The remote-snapshot fast path (``[fast_path]``): see :mod:`stratasnap.server.fastpath`."""

    enabled: bool = True
    #: containerd's socket, whose content service holds the blobs containerd fetched.
    containerd_address: Path = DEFAULT_CONTAINERD_ADDRESS
    #: Seconds to wait for a blob containerd is still fetching, then fall back.
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    #: Seconds to wait for a blob that is neither stored nor being fetched while other
    #: blobs of the namespace are, then fall back. With nothing being fetched at all
    #: (containerd 1.6/1.7 fetch the first layer they unpack only after its Prepare
    #: returns) the fallback comes after 0.1 s.
    fetch_start_timeout: float = DEFAULT_FETCH_START_TIMEOUT


@dataclass(frozen=True)
class GroupCommitConfig:
    """Whether concurrent write calls share one metadata commit (fsync), and how many at most."""

    enabled: bool = True
    max_batch: int = MAX_BATCH

    @property
    def batch_limit(self) -> int:
        """The batch bound the store gets: 1 (every write commits alone) when disabled."""
        return self.max_batch if self.enabled else 1


@dataclass(frozen=True)
class Config:
    """The server's settings. Build it with :func:`load_config` (which validates).

    ``snapshotters`` is never empty after construction: without any, it holds
    one named ``stratasnap`` with ``backend`` on ``root``.
    """

    root: Path = DEFAULT_ROOT
    address: Path = DEFAULT_ADDRESS
    backend: str = DEFAULT_BACKEND
    snapshotters: tuple[SnapshotterConfig, ...] = ()
    log_level: str = "info"
    #: ``host:port`` of the Prometheus endpoint; empty: no endpoint.
    metrics_address: str = ""
    #: Group (name or number) allowed to use the socket (mode 0660); empty: 0600, owner only.
    socket_group: str = ""
    #: Seconds in-flight calls get to finish on SIGTERM/SIGINT before they are cancelled.
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    fast_path: FastPathConfig = FastPathConfig()
    #: Group commit of every snapshotter's store (see :mod:`stratasnap.group_commit`).
    group_commit: GroupCommitConfig = GroupCommitConfig()
    #: The file this was read from, if any (for messages).
    source: Path | None = None

    def __post_init__(self) -> None:
        if not self.snapshotters:
            default = SnapshotterConfig(DEFAULT_NAME, self.backend, self.root)
            object.__setattr__(self, "snapshotters", (default,))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.snapshotters)

    def snapshotter(self, name: str) -> SnapshotterConfig:
        """The snapshotter named ``name`` (KeyError if there is none)."""
        for s in self.snapshotters:
            if s.name == name:
                return s
        raise KeyError(name)


# -- loading ----------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None,
    *,
    root: str | Path | None = None,
    address: str | Path | None = None,
    backend: str | None = None,
    log_level: str | None = None,
    metrics_address: str | None = None,
    socket_group: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Config:
    """Read ``path`` (if given), apply the keyword overrides (command-line flags), validate.

    An override wins over the file; ``None`` leaves the file's value (or the
    default). Relative paths given as overrides are taken from the current
    directory; paths in the file must be absolute. ``options`` (``-o KEY=VALUE``)
    are merged into the backend options of the snapshotter, and need the
    config to have a single one. Raises :class:`ConfigError`.
    """
    data: dict[str, Any] = {}
    source = Path(path) if path is not None else None
    if source is not None:
        try:
            text = source.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {source}: {e.strerror or e}") from None
        data = _parse_toml(text, source)
    overrides: dict[str, Any] = {
        "root": _absolute(root),
        "address": _absolute(address),
        "backend": backend,
        "log_level": log_level,
        "metrics_address": metrics_address,
        "socket_group": socket_group,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = _build(data, source)
    if options:
        if len(config.snapshotters) != 1:
            raise ConfigError(
                f"{_where(source)}: snapshotters: backend options given on the command line "
                "need a single snapshotter; set them in [snapshotters.NAME] options instead"
            )
        only = config.snapshotters[0]
        merged = MappingProxyType({**only.options, **options})
        config = replace(config, snapshotters=(replace(only, options=merged),))
    return config


def parse_config(text: str, source: str | Path | None = None) -> Config:
    """Validate a config given as TOML text (``source`` only names it in messages)."""
    where = Path(source) if source is not None else None
    return _build(_parse_toml(text, where), where)


def _absolute(p: str | Path | None) -> str | None:
    return None if p is None else str(Path(p).absolute())


def _parse_toml(text: str, source: Path | None) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{_where(source)}: not valid TOML: {e}") from None


def _where(source: Path | None) -> str:
    return f"config {source}" if source is not None else "config"


def _build(data: Mapping[str, Any], source: Path | None) -> Config:
    where = _where(source)

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {problem}")

    for key in data:
        if key not in _TOP_KEYS:
            raise fail(key, f"unknown key (known: {', '.join(_TOP_KEYS)})")
    version = data.get("version", 1)
    if type(version) is not int or version != 1:
        raise fail("version", f"unsupported version {version!r} (this stratasnap reads 1)")

    root = _path(data, "root", DEFAULT_ROOT, fail)
    address = _path(data, "address", DEFAULT_ADDRESS, fail)
    if len(str(address).encode()) > MAX_SOCKET_PATH:
        raise fail("address", f"{str(address)!r} is longer than {MAX_SOCKET_PATH} bytes")
    backend = _string(data, "backend", DEFAULT_BACKEND, fail)
    if not backend:
        raise fail("backend", "must not be empty")
    log_level = _string(data, "log_level", "info", fail).lower()
    if log_level == "warn":
        log_level = "warning"
    if log_level not in LOG_LEVELS:
        raise fail("log_level", f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    metrics_address = _string(data, "metrics_address", "", fail)
    if metrics_address:
        try:
            parse_host_port(metrics_address)
        except ValueError as e:
            raise fail("metrics_address", str(e)) from None
    socket_group = data.get("socket_group", "")
    if type(socket_group) is int:
        socket_group = str(socket_group)
    if not isinstance(socket_group, str):
        raise fail("socket_group", f"expected a group name or number, got {socket_group!r}")
    timeout = _seconds(data, "shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT, fail)
    fast_path = _fast_path(data.get("fast_path", {}), fail)

    group_commit = _group_commit(data.get("group_commit", {}), fail)

    tables = data.get("snapshotters", {})
    if not isinstance(tables, dict):
        raise fail("snapshotters", "expected tables [snapshotters.NAME]")
    snapshotters = []
    for name, table in tables.items():
        key = f"snapshotters.{name}"
        if not _NAME.match(name):
            raise fail(key, "a name may only hold letters, digits, '_' and '-'")
        if not isinstance(table, dict):
            raise fail(key, "expected a table")
        for k in table:
            if k not in _SNAPSHOTTER_KEYS:
                known = ", ".join(_SNAPSHOTTER_KEYS)
                raise fail(f"{key}.{k}", f"unknown key (known: {known})")
        sn_backend = _string(table, "backend", backend, fail, prefix=key)
        if not sn_backend:
            raise fail(f"{key}.backend", "must not be empty")
        default_root = root if len(tables) == 1 else root / name
        sn_root = _path(table, "root", default_root, fail, prefix=key)
        options = table.get("options", {})
        if not isinstance(options, dict):
            raise fail(f"{key}.options", "expected a table of backend options")
        snapshotters.append(
            SnapshotterConfig(name, sn_backend, sn_root, MappingProxyType(dict(options)))
        )
    seen: dict[Path, str] = {}
    for s in snapshotters:
        if s.root in seen:
            raise fail(
                f"snapshotters.{s.name}.root",
                f"{str(s.root)!r} is also the root of snapshotter {seen[s.root]!r}",
            )
        seen[s.root] = s.name

    return Config(
        root=root,
        address=address,
        backend=backend,
        snapshotters=tuple(snapshotters),
        log_level=log_level,
        metrics_address=metrics_address,
        socket_group=socket_group,
        shutdown_timeout=timeout,
        fast_path=fast_path,
        group_commit=group_commit,
        source=source,
    )


def _seconds(
    data: Mapping[str, Any], key: str, default: float, fail: _Fail, prefix: str = ""
) -> float:
    value = data.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        name = f"{prefix}.{key}" if prefix else key
        raise fail(name, f"expected a number of seconds >= 0, got {value!r}")
    return float(value)


def _switched_table(
    table: object, name: str, known: tuple[str, ...], fail: _Fail
) -> tuple[dict[str, Any], bool]:
    """A table ``[name]`` of only ``known`` keys, and its ``enabled`` switch (default on)."""
    if not isinstance(table, dict):
        raise fail(name, f"expected a table [{name}]")
    for k in table:
        if k not in known:
            raise fail(f"{name}.{k}", f"unknown key (known: {', '.join(known)})")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail(f"{name}.enabled", f"expected true or false, got {enabled!r}")
    return table, enabled


def _fast_path(section: object, fail: _Fail) -> FastPathConfig:
    table, enabled = _switched_table(section, "fast_path", _FAST_PATH_KEYS, fail)
    address = _path(
        table, "containerd_address", DEFAULT_CONTAINERD_ADDRESS, fail, prefix="fast_path"
    )
    return FastPathConfig(
        enabled=enabled,
        containerd_address=address,
        fetch_timeout=_seconds(table, "fetch_timeout", DEFAULT_FETCH_TIMEOUT, fail, "fast_path"),
        fetch_start_timeout=_seconds(
            table, "fetch_start_timeout", DEFAULT_FETCH_START_TIMEOUT, fail, "fast_path"
        ),
    )


def _group_commit(section: object, fail: _Fail) -> GroupCommitConfig:
    table, enabled = _switched_table(section, "group_commit", _GROUP_COMMIT_KEYS, fail)
    max_batch = table.get("max_batch", MAX_BATCH)
    if type(max_batch) is not int or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise fail(
            "group_commit.max_batch",
            f"expected a number of write calls from 1 to {MAX_BATCH_LIMIT}, got {max_batch!r}",
        )
    return GroupCommitConfig(enabled, max_batch)


def _string(data: Mapping[str, Any], key: str, default: str, fail: _Fail, prefix: str = "") -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        name = f"{prefix}.{key}" if prefix else key
        raise fail(name, f"expected a string, got {value!r}")
    return value


def _path(data: Mapping[str, Any], key: str, default: Path, fail: _Fail, prefix: str = "") -> Path:
    name = f"{prefix}.{key}" if prefix else key
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise fail(name, f"expected a path, got {value!r}")
    if not value.startswith("/"):
        raise fail(name, f"{value!r} is not an absolute path")
    return Path(value)


def parse_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port``, ``:port`` for every address); ValueError if bad."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 host in brackets, [::1]:PORT")
    return host, int(port)


# -- text for people and for containerd -------------------------------------------------


def default_config_text() -> str:
    """A commented config file holding the defaults (``stratasnap config default``)."""
    return f"""\
# stratasnap server configuration (TOML). Every key is optional; the values
# below are the defaults. Command-line flags override this file.
version = 1

# Where snapshots and their metadata live. containerd learns it through the
# proxy plugin's exports (see `stratasnap config containerd`).
root = "{DEFAULT_ROOT}"

# The unix socket containerd connects to ([proxy_plugins.NAME] address).
address = "{DEFAULT_ADDRESS}"

# The backend of the default snapshotter: native (directory copies, works
# anywhere), overlay (overlayfs, needs root), blockfile (filesystem images),
# erofs (overlay whose committed layers are read-only EROFS images).
# btrfs (subvolume snapshots; the root must be on btrfs).
backend = "{DEFAULT_BACKEND}"

# debug, info, warning, error or critical.
log_level = "info"

# host:port of a Prometheus endpoint (/metrics); empty: none.
# metrics_address = "127.0.0.1:9411"
metrics_address = ""

# A group (name or number) whose members may use the socket too (mode 0660).
# Empty: only the owner (root) may, mode 0600.
socket_group = ""

# Seconds in-flight calls get to finish on SIGTERM/SIGINT.
shutdown_timeout = {DEFAULT_SHUTDOWN_TIMEOUT}

# containerd pulls that skip containerd's own unpack (the remote-snapshot
# protocol): when containerd prepares a layer with the labels
# containerd.io/snapshot.ref and containerd.io/snapshot/cri.layer-digest (CRI
# with disable_snapshot_annotations = false, nerdctl, clients using
# snapshotters.AppendInfoHandlerWrapper) and the snapshotter's backend can
# convert a layer tar itself (erofs), stratasnap reads the blob from
# containerd's content store, commits the layer and containerd skips its
# unpack. Anything wrong falls back to containerd's unpack (logged).
[fast_path]
enabled = true
# containerd's socket (its content service).
containerd_address = "{DEFAULT_CONTAINERD_ADDRESS}"
# Seconds to wait for a blob containerd is still fetching.
fetch_timeout = {DEFAULT_FETCH_TIMEOUT}
# Seconds to wait for a blob nobody is fetching yet while other blobs are
# being fetched. With nothing being fetched at all, the layer falls back after
# 0.1 s (containerd 1.6/1.7 begin fetching only once the first layer of a pull
# is prepared: that layer goes the normal way).
fetch_start_timeout = {DEFAULT_FETCH_START_TIMEOUT}

# Group commit: write calls (prepare, view, commit, remove, update, cleanup)
# that arrive while a metadata commit is being flushed share the next one, so
# N concurrent writes cost one fsync instead of N. Every caller still hears
# back only once its change is durable, and a lone call commits at once.
# enabled = false makes every write commit alone; max_batch (1 to
# {MAX_BATCH_LIMIT}) bounds how many share one commit, and so how long the first
# caller of a batch can wait for the others.
[group_commit]
enabled = true
max_batch = {MAX_BATCH}

# Several snapshotters on one socket: one table each, one containerd proxy
# plugin each (containerd sends the plugin name with every request). Without
# any table there is a single snapshotter named "{DEFAULT_NAME}" using
# `backend` on `root`. With several, each root defaults to <root>/<name>.
#
# [snapshotters.stratasnap]
# backend = "native"
#
# [snapshotters.stratasnap-overlay]
# backend = "overlay"
# root = "/var/lib/stratasnap/overlay"
# options = {{}}    # backend options, passed to open_snapshotter
"""


def snapshotter_capabilities(obj: object) -> tuple[str, ...]:
    """The proxy capabilities (``rebase``, ``remap-ids``…) a snapshotter or backend declares.

    Read from a ``capabilities`` attribute (a sequence of strings, or a
    callable returning one); none declared means none.
    """
    caps = getattr(obj, "capabilities", ())
    if callable(caps):
        caps = caps()
    if isinstance(caps, str):
        return (caps,)
    return tuple(str(c) for c in caps or ())


def containerd_snippet(
    config: Config, capabilities: Mapping[str, Sequence[str]] | None = None
) -> str:
    """The ``[proxy_plugins]`` block for containerd's config.toml (``config containerd``).

    ``capabilities`` maps a snapshotter name to what it supports; when it is
    not given (or lacks a name) they come from :func:`probe_capabilities`,
    which raises :class:`ConfigError` for a backend or option it refuses.
    """
    lines = [
        "# stratasnap as containerd snapshotter(s): add this to containerd's config.toml",
        "# (version 2 or 3) and restart containerd. Select it with",
        f"# `ctr --snapshotter {config.snapshotters[0].name} ...` or, for CRI,",
        f'# snapshotter = "{config.snapshotters[0].name}".',
    ]
    for s in config.snapshotters:
        if capabilities is not None and s.name in capabilities:
            caps = tuple(capabilities[s.name])
        else:
            caps = probe_capabilities(s)
        lines += [
            f"[proxy_plugins.{s.name}]",
            '  type = "snapshot"',
            f"  address = {_toml_str(str(config.address))}",
            f"  capabilities = [{', '.join(_toml_str(c) for c in caps)}]",
            f"  [proxy_plugins.{s.name}.exports]",
            f"    root = {_toml_str(str(s.root))}",
        ]
    return "\n".join(lines) + "\n"


def probe_capabilities(snapshotter: SnapshotterConfig) -> tuple[str, ...]:
    """The capabilities of ``snapshotter``'s backend with its options, without opening a store.

    Raises :class:`ConfigError` naming the snapshotter when the backend is
    unknown or refuses an option (a bad value, an unknown key): the same
    error the server would meet at start, reported before containerd is
    told to use it.
    """
    from ..backends import backend_class
    from ..errors import SnapshotError

    try:
        cls = backend_class(snapshotter.backend)
        # What an instance with these options offers (overlay: slow_chown, kernel).
        return tuple(str(c) for c in cls.capabilities_for(snapshotter.options))
    except SnapshotError as exc:
        raise ConfigError(f"snapshotters.{snapshotter.name}: {exc}") from None


def _toml_str(s: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes, \\uXXXX included).
    return json.dumps(s, ensure_ascii=False)
