"""`tandem chat --server HOST:PORT [--system TEXT]`: an interactive multi-turn chat, streamed.

The conversation is kept in the HH-RLHF format the learner trains on:
    SYSTEM + "\\n\\nHuman: ...\\n\\nAssistant: ..." turns, each reply stopped at "\\n\\nHuman:".
"""

from __future__ import annotations

import argparse
import sys

import grpc

from cli.common import add_server_option, connect
from cli.complete import add_sampling_options, sampling_kwargs
from clients.results import TandemError

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a served model (reads stdin; /quit or EOF ends)")
    add_server_option(p)
    add_sampling_options(p, temperature=0.7, max_new_tokens=128)
    p.add_argument("--system", default="", metavar="TEXT", help="text put before the conversation")
    p.set_defaults(run=run)


def build_prompt(system: str, turns: list[tuple[str, str]], message: str) -> str:
    history = "".join(f"{HUMAN} {human}{ASSISTANT} {reply}" for human, reply in turns)
    return f"{system}{history}{HUMAN} {message}{ASSISTANT}"


def run(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    turns: list[tuple[str, str]] = []
    params = {**sampling_kwargs(args), "stop": [HUMAN]}
    with connect(args) as client:
        while True:
            message = _read(interactive)
            if message is None or message.strip() == "/quit":
                return 0
            if not message.strip():
                continue
            reply = _reply(client, args.system, turns, message.strip(), params)
            turns.append((message.strip(), reply.strip()))


def _read(interactive: bool) -> str | None:
    try:
        return input("Human: ") if interactive else (sys.stdin.readline() or None)
    except EOFError:
        return None


def _reply(client, system: str, turns: list[tuple[str, str]], message: str, params: dict) -> str:
    """Stream one reply to stdout; drop the oldest turns while the conversation exceeds the context."""
    while True:
        parts: list[str] = []
        try:
            for delta in client.generate_stream(build_prompt(system, turns, message), **params):
                text = delta.text if parts else delta.text.lstrip()
                if text:
                    sys.stdout.write(text if parts else "Assistant: " + text)
                    sys.stdout.flush()
                    parts.append(text)
        except TandemError as err:
            if err.code == grpc.StatusCode.INVALID_ARGUMENT and "model context" in err.details and turns:
                del turns[0]
                continue
            if parts:
                sys.stdout.write("\n")
            raise
        sys.stdout.write("\n" if parts else "Assistant:\n")
        sys.stdout.flush()
        return "".join(parts)
