"""`python -m learner <sft|reward|ppo> [--config FILE.json] [--field value ...]`

Also runs under the launcher: `deepspeed --num_gpus N --module learner sft ...`. A bad configuration
is reported as one line naming the field, with exit status 2 and no traceback; a generation server that
stays unreachable past server_down_limit_s (rollout=remote) as one line naming it and the limit, with exit
status 1; the final metrics are printed as one JSON line on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from common.errors import ConfigError
from common.progress import quiet_piped_bars
from learner.cli_args import parse_config
from learner.config import STEPS

USAGE = f"usage: python -m learner {{{','.join(STEPS)}}} [--config FILE.json] [--field value ...]"
MODEL_FIELDS = {"sft": ("model",), "reward": ("model",),
                "ppo": ("model", "actor_model", "critic_model", "reward_model")}


def setup_logging() -> None:
    quiet_piped_bars()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def runner(step: str):
    if step == "sft":
        from learner.sft import run_sft
        return run_sft
    if step == "reward":
        from learner.reward import run_reward
        return run_reward
    from learner.ppo.step import run_ppo
    return run_ppo


def main(argv: list[str] | None = None, prog: str = "python -m learner") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank=") and not a.startswith("--local-rank=")]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    step, rest = argv[0], argv[1:]
    if step not in STEPS:
        print(f"{prog}: error: step: must be one of {', '.join(STEPS)}, got {step!r}", file=sys.stderr)
        return 2
    try:
        config = parse_config(step, rest, prog=f"{prog} {step}")
        from learner.inputs import check_inputs
        check_inputs(config, MODEL_FIELDS[step])
    except ConfigError as e:
        print(f"{prog} {step}: error: {e}", file=sys.stderr)
        return 2
    setup_logging()
    from learner.rollout.reconnect import ServerDown

    try:
        result = runner(step)(config)
    except ConfigError as e:
        print(f"{prog} {step}: error: {e}", file=sys.stderr)
        return 2
    except ServerDown as e:
        print(f"{prog} {step}: error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"step": step, **result}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
