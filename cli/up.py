"""`tandem up`: the main job on the embedded default (serve, learn SFT / reward / PPO through the server,
push weights after every PPO iteration, show the served model improved). Ctrl-C stops both services."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    from learner.config import ALGOS

    p = subparsers.add_parser("up", help="the main job: serve a model and train it with RLHF through the server",
                              description=__doc__)
    p.add_argument("--run-dir", default="runs/up", metavar="DIR", help="where checkpoints, logs and plots go")
    p.add_argument("--model", default="", metavar="PATH", help="local HF model folder (default: the embedded model)")
    p.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="dataset spec, repeatable (default: the embedded task, which has the gold judge)")
    p.add_argument("--ranks", type=int, default=1, metavar="N", help="learner ranks (deepspeed launcher when > 1)")
    p.add_argument("--zero-stage", type=int, default=-1, metavar="S", help="ZeRO stage (default: 0 for 1 rank, else 3)")
    p.add_argument("--iterations", type=int, default=0, metavar="N", help="PPO iterations (default: the pipeline's)")
    p.add_argument("--algo", default="ppo", choices=ALGOS,
                   help="step 3's algorithm: PPO (critic, GAE) or a critic-free one (default: %(default)s)")
    p.add_argument("--max-staleness", type=int, default=1, metavar="K",
                   help="weight versions a rollout may lag the learner (0: no overlap)")
    p.add_argument("--push-quantize", default="none", choices=("none", "bfloat16", "int8", "int4"),
                   help="weight encoding on the wire (default: %(default)s, exact fp32)")
    p.add_argument("--learner-threads", type=int, default=1, metavar="N", help="torch threads per learner rank")
    p.add_argument("--update-threads", type=int, default=0, metavar="N",
                   help="threads of each rank's update once the server has generated the next batch "
                        "(default: cores / ranks)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--set", action="append", default=[], metavar="STEP.FIELD=VALUE",
                   help="override a step's config field, e.g. --set ppo.kl_coef=0.02 (value parsed as JSON)")
    p.add_argument("--summary", default="", metavar="PATH", help="write the final figures as JSON here")
    p.set_defaults(run=run, default_log_level="WARNING", parser=p)


add_parser = register


def parse_overrides(items: list[str]) -> dict[str, dict]:
    from common.errors import ConfigError

    out: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        step, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError("set", f"expected STEP.FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(step, {})[name] = value
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from common.errors import ConfigError
    from learner.jobs.up import UpConfig, run_up

    try:
        config = UpConfig(run_dir=args.run_dir, model=args.model, data=args.data, seed=args.seed, ranks=args.ranks,
                          zero_stage=args.zero_stage, iterations=args.iterations, algo=args.algo,
                          max_staleness=args.max_staleness,
                          push_quantize=args.push_quantize, summary=args.summary, learner_threads=args.learner_threads,
                          update_threads=args.update_threads,
                          overrides=parse_overrides(args.set)).validate()
    except ConfigError as err:
        args.parser.error(f"{'--' + err.field.replace('_', '-')}: {err.message}")   # exits 2
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():   # SIGTERM stops both services like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_up(config)
    except ConfigError as err:
        print(f"tandem up: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"tandem up: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tandem up: interrupted; the learner and the server are stopped", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cli.up ...` (the same as `tandem up ...`)."""
    import logging

    parser = argparse.ArgumentParser(prog="tandem")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["up", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
