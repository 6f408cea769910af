"""`tandem complete --server HOST:PORT [options] PROMPT`: print one completion (greedy by default)."""

from __future__ import annotations

import argparse
import sys

from cli.common import add_server_option, connect


def add_sampling_options(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    p.add_argument("--temperature", type=float, default=temperature, metavar="T", help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--seed", type=int, default=None, metavar="S")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed}


def register(subparsers) -> None:
    p = subparsers.add_parser("complete", help="complete a prompt")
    add_server_option(p)
    add_sampling_options(p, temperature=0.0, max_new_tokens=64)
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeat for several); the text is cut before it")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads it from stdin)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = {**sampling_kwargs(args), "stop": args.stop or None}
    with connect(args) as client:
        if args.stream:
            for delta in client.generate_stream(prompt, **params):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            [completion] = client.generate(prompt, **params)
            print(completion.text)
    return 0
