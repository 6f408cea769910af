"""`tandem plot RUN_DIR [--out DIR]`: draw every metrics.jsonl under a run folder to PNG."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw a run's metrics (metrics.jsonl) to PNG files")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or one metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="DIR", help="write the PNGs here (default: beside each metrics.jsonl)")
    p.set_defaults(run=run)


add_parser = register


def run(args: argparse.Namespace) -> int:
    from learner.plot import plot_run

    try:
        written = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"tandem plot: error: run_dir: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0 if written else 1
