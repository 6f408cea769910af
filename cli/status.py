"""`tandem status --server HOST:PORT [--json]`: what the server runs and how busy it is."""

from __future__ import annotations

import argparse
import dataclasses
import json

from cli.common import add_server_option, connect


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="show a server's status")
    add_server_option(p)
    p.add_argument("--json", action="store_true", help="print the fields as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with connect(args, timeout=args.timeout or 10.0) as client:
        status = client.status()
        health = client.health()
    if args.json:
        print(json.dumps({"server": args.server, "health": health, **dataclasses.asdict(status)}, indent=2))
        return 0
    s = status
    rows = [
        ("server", f"{args.server} ({health})"),
        ("model", s.model),
        ("weights", f"version {s.weight_version} from {s.weight_origin or '-'}"),
        ("device", f"{s.device}, {s.dtype}, tensor parallel {s.tensor_parallel}"),
        ("requests", f"{s.running} running, {s.waiting} waiting, {s.requests_finished} finished"),
        ("tokens generated", str(s.tokens_generated)),
        ("kv cache", f"{s.kv_blocks_free}/{s.kv_blocks_total} blocks free, {s.block_size} tokens each"),
        ("token budget", f"{s.token_budget} per forward pass"),
        ("context", f"{s.max_model_len} tokens"),
        ("uptime", f"{s.uptime_s:.1f} s (instance {s.instance_id or '-'})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
