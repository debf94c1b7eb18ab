"""The deployment files agree with the server's defaults and with each other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from stratasnap.server.config import (
    DEFAULT_ADDRESS,
    DEFAULT_ROOT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    containerd_snippet,
    load_config,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_containerd_drop_in_is_what_config_containerd_prints() -> None:
    drop_in = tomllib.loads((DEPLOY / "containerd" / "stratasnap.toml").read_text())
    assert drop_in["version"] == 2
    printed = tomllib.loads(containerd_snippet(load_config()))
    assert drop_in["proxy_plugins"] == printed["proxy_plugins"]
    assert drop_in["proxy_plugins"]["stratasnap"]["address"] == str(DEFAULT_ADDRESS)


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "stratasnap.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit() -> None:
    unit = _unit()
    assert unit["Unit"]["Before"] == ["containerd.service"]
    service = unit["Service"]
    assert service["Type"] == ["notify"]  # ready means listening (sd_notify READY=1)
    assert service["ExecStart"][0].split()[1:] == [
        "serve",
        "--config",
        "/etc/stratasnap/config.toml",
    ]
    assert int(service["TimeoutStopSec"][0]) > DEFAULT_SHUTDOWN_TIMEOUT
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["RuntimeDirectory"] == [DEFAULT_ADDRESS.parent.name]
    assert service["StateDirectory"] == [DEFAULT_ROOT.name]
    assert "PrivateMounts" not in service and "PrivateTmp" not in service
    assert "containerd.service" in unit["Install"]["WantedBy"][0].split()


def test_daemonset() -> None:
    text = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    assert "kind: DaemonSet" in text
    assert re.search(r"privileged: true", text)
    for path in (str(DEFAULT_ROOT), str(DEFAULT_ADDRESS.parent)):
        assert re.search(rf"hostPath:\n\s+path: {re.escape(path)}\n", text), path
        assert re.search(
            rf"mountPath: {re.escape(path)}\n(\s+#.*\n)*\s+mountPropagation: Bidirectional", text
        ), path
    assert f"--address={DEFAULT_ADDRESS}" in text and f"--root={DEFAULT_ROOT}" in text
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", text).group(1))  # type: ignore[union-attr]
    assert grace > DEFAULT_SHUTDOWN_TIMEOUT
