"""`python -m serving --model PATH ...`: the server alone (what `tandem serve` runs, and what every
child server process is started as: see serving.launch)."""

from __future__ import annotations

import argparse
import logging
import sys

from serving import options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=options.DESCRIPTION)
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    options.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return options.run(args, parser)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
