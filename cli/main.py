"""The `tandem` command line: a thin layer over the library (subcommands live in cli/)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cli import COMMANDS
from cli.common import report
from clients.results import TandemError
from common.progress import quiet_piped_bars


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="ChatGPT-style models, served and trained in tandem.")
    parser.add_argument("--log-level", default=None, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default: INFO for serve and long jobs, WARNING for client commands)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_piped_bars()
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or getattr(args, "default_log_level", "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except TandemError as err:
        return report(args.command, err)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
