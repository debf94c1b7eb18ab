"""``python -m stratasnap.server``: serve, or print configs (until ``stratasnap`` wires them).

python -m stratasnap.server serve --root DIR --address SOCK [--backend NAME]
                                  [--config FILE] [--log-level LEVEL]
                                  [--metrics-address HOST:PORT] [--socket-group GROUP]
python -m stratasnap.server config default
python -m stratasnap.server config containerd [--config FILE] [--root DIR] ...
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, containerd_snippet, default_config_text, load_config


def _config_flags(parser: argparse.ArgumentParser, serving: bool) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML config file")
    parser.add_argument("--root", metavar="DIR", help="where snapshots live")
    parser.add_argument("--address", "-a", metavar="SOCK", help="unix socket to serve on")
    parser.add_argument("--backend", metavar="NAME", help="backend of the default snapshotter")
    if serving:
        parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning, error")
        parser.add_argument(
            "--metrics-address", metavar="HOST:PORT", help="serve Prometheus /metrics there"
        )
        parser.add_argument("--socket-group", metavar="GROUP", help="group allowed on the socket")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stratasnap.server")
    sub = parser.add_subparsers(dest="command", required=True)
    _config_flags(sub.add_parser("serve", help="serve containerd's snapshots API"), True)
    config = sub.add_parser("config", help="print configuration")
    what = config.add_subparsers(dest="what", required=True)
    what.add_parser("default", help="a commented default config file")
    _config_flags(what.add_parser("containerd", help="the [proxy_plugins] block"), False)
    args = parser.parse_args(argv)

    if args.command == "config" and args.what == "default":
        sys.stdout.write(default_config_text())
        return 0
    try:
        cfg = load_config(
            args.config,
            root=args.root,
            address=args.address,
            backend=args.backend,
            log_level=getattr(args, "log_level", None),
            metrics_address=getattr(args, "metrics_address", None),
            socket_group=getattr(args, "socket_group", None),
        )
    except ConfigError as e:
        print(f"stratasnap: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        sys.stdout.write(containerd_snippet(cfg))
        return 0

    from .daemon import DaemonError, serve

    try:
        serve(cfg)
    except DaemonError as e:
        print(f"stratasnap: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
