"""`tandem balance --backends HOST:PORT,HOST:PORT --port P`: one gRPC address in front of running servers."""

from __future__ import annotations

import argparse

from common.errors import ConfigError
from serving.options import add_tls_arguments, tls_config

OPTIONS = {"backends": "--backends", "host": "--host", "port": "--port", "health_interval_s": "--health-interval",
           "push_token_file": "--push-token-file", "tls_cert": "--tls-cert", "tls_key": "--tls-key",
           "tls_client_ca": "--tls-client-ca", "tls_ca": "--backend-tls-ca"}


def register(subparsers) -> None:
    p = subparsers.add_parser("balance", help="route requests over several running servers",
                              description="Serve one gRPC address in front of running `tandem serve` replicas: "
                                          "each request goes to the least-loaded healthy replica, a dead replica "
                                          "leaves the rotation, and a request is retried on another replica when "
                                          "nothing was streamed yet. Weight pushes go to every replica.")
    p.add_argument("--backends", required=True, metavar="HOST:PORT,...", help="comma-separated replica addresses")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0: pick a free port (default: %(default)s)")
    p.add_argument("--health-interval", type=float, default=0.5, metavar="S",
                   help="seconds between health checks of each replica (default: %(default)s)")
    p.add_argument("--push-token-file", default=None, metavar="FILE",
                   help="the credential PushWeights calls must carry, checked here before forwarding (else "
                        "$TANDEM_PUSH_TOKEN; with neither, weight pushes are refused)")
    add_tls_arguments(p)
    p.add_argument("--backend-tls-ca", default=None, metavar="FILE",
                   help="reach the replicas over TLS, trusting this CA (default: plaintext)")
    p.set_defaults(run=run, default_log_level="INFO", parser=p)


def run(args: argparse.Namespace) -> int:
    from serving.fleet.balancer import BalancerConfig
    from serving.fleet.replicas import serve_balancer

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    config = BalancerConfig(backends=backends, host=args.host, port=args.port,
                            health_interval_s=args.health_interval, push_token_file=args.push_token_file,
                            tls=tls_config(args), backend_tls_ca=args.backend_tls_ca)
    try:
        config.validate()
        return serve_balancer(config, ready=_print_ready)
    except ConfigError as err:
        args.parser.error(f"{OPTIONS.get(err.field, err.field)}: {err.message}")   # exits 2


def _print_ready(balancer) -> None:
    print(f"balancing {len(balancer.replicas)} replicas on {balancer.address}", flush=True)
