"""Options and error reporting shared by the client subcommands."""

from __future__ import annotations

import argparse
import sys

import grpc

from clients.results import TandemError


def add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT",
                        help="address of a running `tandem serve` (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="deadline of each call in seconds (default: none)")


def report(command: str, err: TandemError) -> int:
    """Print a one-line message naming the server; return exit code 1."""
    if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        print(f"tandem {command}: cannot reach the server at {err.target} ({err.code.name}: "
              f"{err.details.splitlines()[0] if err.details else 'no answer'})", file=sys.stderr)
    else:
        print(f"tandem {command}: the server at {err.target} answered {err.code.name}: {err.details}",
              file=sys.stderr)
    return 1
