"""`tandem learn <sft|reward|ppo> [--num-ranks N] [--master-port P] [--config FILE.json] [--field value ...]`

A thin wrapper over `deepspeed --num_gpus N --module learner <step> ...`: it checks the configuration
first (a bad one is a one-line error naming the field, exit 2, before any process starts), picks a
free --master_port, then execs the DeepSpeed launcher. Every option of `python -m learner` is accepted.
"""

from __future__ import annotations

import argparse
import os
import sys

from common.net import free_port

STEPS = ("sft", "reward", "ppo")


def register(subparsers) -> None:
    p = subparsers.add_parser("learn", help="train one learner step (SFT, reward model, PPO) under the deepspeed launcher",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=STEPS)
    p.add_argument("options", nargs=argparse.REMAINDER,
                   help="--num-ranks N, --master-port P and any learner option (python -m learner STEP --help)")
    p.set_defaults(run=run, default_log_level="INFO")


add_parser = register


def pop_option(options: list[str], *names: str) -> str | None:
    """Remove `--name VALUE` / `--name=VALUE` from options; its value or None."""
    for i, opt in enumerate(options):
        for name in names:
            if opt == name and i + 1 < len(options):
                value = options[i + 1]
                del options[i:i + 2]
                return value
            if opt.startswith(name + "="):
                del options[i]
                return opt.split("=", 1)[1]
    return None


def launcher_command(step: str, options: list[str], num_ranks: int, master_port: int) -> list[str]:
    from learner.launcher import deepspeed_command

    return deepspeed_command("learner", [step, *options], num_ranks, master_port)


def run(args: argparse.Namespace) -> int:
    from common.errors import ConfigError
    from learner.__main__ import MODEL_FIELDS
    from learner.cli_args import parse_config
    from learner.inputs import check_inputs

    options = list(args.options)
    port = pop_option(options, "--master-port", "--master_port")
    try:
        config = parse_config(args.step, list(options), prog=f"tandem learn {args.step}")
        check_inputs(config, MODEL_FIELDS[args.step])
        master_port = int(port) if port else free_port()
    except ConfigError as e:
        print(f"tandem learn {args.step}: error: {e}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"tandem learn {args.step}: error: master_port: expected int, got {port!r}", file=sys.stderr)
        return 2
    command = launcher_command(args.step, options, config.deepspeed.num_ranks, master_port)
    print("tandem learn: " + " ".join(command[1:]), file=sys.stderr, flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["learn", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
