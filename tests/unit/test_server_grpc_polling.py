"""``stratasnap serve`` asks grpc to poll sockets on its serving thread, before grpc starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from stratasnap.server.grpc_polling import EXPERIMENTS, VARIABLE, poll_on_serving_thread


def test_sets_the_experiments_when_unset_and_grpc_not_started() -> None:
    # Run where grpc is not imported yet (this test process has imported it).
    code = textwrap.dedent(
        f"""
        import os, sys
        from stratasnap.server.grpc_polling import poll_on_serving_thread
        assert "grpc" not in sys.modules
        print(poll_on_serving_thread(), os.environ.get({VARIABLE!r}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", EXPERIMENTS]


def test_an_operators_setting_stands() -> None:
    env = {VARIABLE: ""}
    assert poll_on_serving_thread(env) is False
    assert env == {VARIABLE: ""}
    env = {VARIABLE: EXPERIMENTS}
    assert poll_on_serving_thread(env) is True


def test_too_late_once_grpc_is_imported() -> None:
    import grpc  # noqa: F401  (grpc's core has read its settings now)

    env: dict[str, str] = {}
    assert poll_on_serving_thread(env) is False
    assert env == {}, "a setting grpc will never read must not pretend to be in effect"


def test_serve_sets_it_before_grpc_is_imported(scratch: Path) -> None:
    # The daemon (which imports grpc) is replaced by one that reports what it
    # found when serve() reached it.
    code = textwrap.dedent(
        f"""
        import json, os, sys, types
        fake = types.ModuleType("stratasnap.server.daemon")
        class DaemonError(Exception):
            pass
        def serve(cfg):
            print(json.dumps([os.environ.get({VARIABLE!r}), "grpc" in sys.modules]))
        fake.DaemonError, fake.serve = DaemonError, serve
        sys.modules["stratasnap.server.daemon"] = fake
        from stratasnap.cli import cli
        cli(["--root", sys.argv[1], "serve", "--address", sys.argv[2]])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    done = subprocess.run(
        [sys.executable, "-c", code, str(scratch / "root"), str(scratch / "s.sock")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [EXPERIMENTS, False]
