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
    add_tls_client_options(parser)


def add_tls_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", default=None, metavar="FILE", help="connect over TLS, trusting this CA certificate")
    parser.add_argument("--tls-cert", default=None, metavar="FILE",
                        help="the client certificate, for a server that requires one (with --tls-key)")
    parser.add_argument("--tls-key", default=None, metavar="FILE", help="the client certificate's key")


def credentials(args: argparse.Namespace):
    """TLS channel credentials from the --tls-* options; None (plaintext) when none is given."""
    from protos.auth import channel_credentials

    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)


def connect(args: argparse.Namespace, timeout: float | None = None):
    """The client SDK over --server, --timeout and the --tls-* options; a bad TLS option exits 2 naming it."""
    from clients.client import TandemClient
    from common.errors import ConfigError

    try:
        creds = credentials(args)
    except ConfigError as err:
        print(f"tandem {args.command}: --{err.field.replace('_', '-')}: {err.message}", file=sys.stderr)
        raise SystemExit(2) from None
    return TandemClient(args.server, timeout=args.timeout if timeout is None else timeout, credentials=creds)


def report(command: str, err: TandemError) -> int:
    """Print a one-line message naming the server; return exit code 1."""
    if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        print(f"tandem {command}: cannot reach the server at {err.target} ({err.code.name}: "
              f"{err.details.splitlines()[0] if err.details else 'no answer'})", file=sys.stderr)
    else:
        print(f"tandem {command}: the server at {err.target} answered {err.code.name}: {err.details}",
              file=sys.stderr)
    return 1
