"""`actor-broker` (also `python -m broker`): the command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from broker.config import DEFAULT_SETTINGS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actor-broker",
        description="Real-time message broker: domain events from backend services to WebSocket clients.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon. With no options: in memory, on 127.0.0.1:8050.",
    )
    serve.add_argument("--host", default=None, help=f"address to listen on (default {DEFAULT_SETTINGS.host})")
    serve.add_argument("--port", type=int, default=None, help=f"port to listen on (default {DEFAULT_SETTINGS.port})")
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=None, help="log level (default info)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from broker.daemon import serve

        overrides = {
            key: value
            for key, value in (("host", args.host), ("port", args.port), ("log_level", args.log_level))
            if value is not None
        }
        return serve(DEFAULT_SETTINGS.replace(**overrides))
    parser.print_help()
    return 2
