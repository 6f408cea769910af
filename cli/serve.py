"""`tandem serve --model PATH ...`: load a model and serve it over gRPC until SIGINT/SIGTERM."""

from __future__ import annotations

from serving import options


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over gRPC", description=options.DESCRIPTION)
    options.add_arguments(p)
    p.set_defaults(run=lambda args: options.run(args, p), default_log_level="INFO")
