"""What one client may ask of the server: request limits, back-pressure, and their command-line options.

Every limit has a safe default and a `tandem serve` option. A request that breaks a limit is refused
before any of it reaches the engine, with a message that names the request field and the limit:
INVALID_ARGUMENT when the request itself is too big (it could never be served here), RESOURCE_EXHAUSTED
when the server is full right now (back-pressure: the client may retry later; nothing is queued).
gRPC itself refuses a message above `max_message_bytes` with RESOURCE_EXHAUSTED.

Work per engine step stays bounded whatever the stop lists: a request carries at most
`max_stop_token_ids` ids and `max_stop_strings` strings of at most `max_stop_chars` characters, and the
detokenizer only searches the tail a new match could be in.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass, fields

from common.errors import ConfigError, InvalidRequest

# field -> (option, help)
_OPTIONS = {
    "max_prompts": ("--max-prompts", "prompts in one GenerateRequest or RolloutRequest"),
    "max_samples": ("--max-samples", "prompts x samples_per_prompt in one RolloutRequest"),
    "max_id_chars": ("--max-id-chars", "characters of request_id, rollout_id and a push's origin"),
    "max_stop_strings": ("--max-stop-strings", "stop strings per request"),
    "max_stop_chars": ("--max-stop-chars", "characters of one stop string"),
    "max_stop_token_ids": ("--max-stop-token-ids", "stop token ids per request"),
    "max_request_tokens": ("--max-request-tokens",
                           "tokens one request may ask for: the sum over its sequences of prompt + max_new_tokens "
                           "(capped at the context length)"),
    "max_message_bytes": ("--max-message-bytes", "gRPC message size, both ways"),
    "max_pending": ("--max-pending", "engine requests running or queued; beyond it calls get RESOURCE_EXHAUSTED"),
}
OPTIONS = {name: option for name, (option, _) in _OPTIONS.items()}


class ServerFull(Exception):
    """Back-pressure: the server holds `max_pending` requests already (RESOURCE_EXHAUSTED)."""


@dataclass
class RequestLimits:
    max_prompts: int = 256
    max_samples: int = 4096
    max_id_chars: int = 256
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_stop_token_ids: int = 64
    max_request_tokens: int = 1 << 20
    max_message_bytes: int = 16 << 20
    max_pending: int = 8192

    def validate(self) -> RequestLimits:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f.name, f"must be an integer >= 1, got {value!r}")
        for name in ("max_prompts", "max_samples"):
            if getattr(self, name) > self.max_pending:
                raise ConfigError(name, f"must be <= max_pending ({self.max_pending}) or no such request could "
                                        f"ever be admitted, got {getattr(self, name)}")
        return self

    # ---------------------------------------------------------------- checks on the raw proto

    def check_id(self, field: str, value: str) -> None:
        if len(value) > self.max_id_chars:
            raise InvalidRequest(field, f"{len(value)} characters exceed the limit max_id_chars={self.max_id_chars}")

    def check_params(self, params, prefix: str = "params.") -> None:
        """params: a proto SamplingParams, or the engine's SamplingParams (prefix "": its own field names)."""
        if len(params.stop_token_ids) > self.max_stop_token_ids:
            raise InvalidRequest(f"{prefix}stop_token_ids", f"{len(params.stop_token_ids)} ids exceed the limit "
                                                            f"max_stop_token_ids={self.max_stop_token_ids}")
        if len(params.stop) > self.max_stop_strings:
            raise InvalidRequest(f"{prefix}stop", f"{len(params.stop)} stop strings exceed the limit "
                                                  f"max_stop_strings={self.max_stop_strings}")
        for j, text in enumerate(params.stop):
            if len(text) > self.max_stop_chars:
                field = f"{prefix}stop[{j}]" if prefix else "stop"
                raise InvalidRequest(field, f"{len(text)} characters exceed the limit "
                                            f"max_stop_chars={self.max_stop_chars}")

    def check_prompts(self, prompts) -> None:
        if len(prompts) > self.max_prompts:
            raise InvalidRequest("prompts", f"{len(prompts)} prompts exceed the limit max_prompts={self.max_prompts}")

    def check_generate(self, msg) -> None:
        """A tandem_pb2.GenerateRequest, before anything is tokenized."""
        self.check_prompts(msg.prompts)
        self.check_id("request_id", msg.request_id)
        self.check_params(msg.params)

    def check_rollout(self, msg) -> None:
        """A tandem_pb2.RolloutRequest, before anything is tokenized."""
        self.check_prompts(msg.prompts)
        self.check_id("rollout_id", msg.rollout_id)
        self.check_params(msg.params)
        samples = len(msg.prompts) * max(1, msg.samples_per_prompt)
        if samples > self.max_samples:
            raise InvalidRequest("samples_per_prompt", f"{len(msg.prompts)} prompts x {max(1, msg.samples_per_prompt)} "
                                                       f"samples = {samples} exceed the limit "
                                                       f"max_samples={self.max_samples}")

    def check_tokens(self, prompts: list[list[int]], max_new_tokens: int, max_model_len: int, repeats: int = 1) -> None:
        """The tokens a request asks for, once its prompts are token ids."""
        total = repeats * sum(min(len(p) + max_new_tokens, max_model_len) for p in prompts)
        if total > self.max_request_tokens:
            raise InvalidRequest("params.max_new_tokens", f"the request asks for {total} tokens (prompt + "
                                                          f"max_new_tokens over its sequences), above the limit "
                                                          f"max_request_tokens={self.max_request_tokens}")

    def check_planned(self, prompts: list[list[int]], params, max_model_len: int, repeats: int = 1) -> None:
        """A request another front (HTTP) built: token-id prompts and engine SamplingParams. Errors name the
        engine's field (each front maps it onto its own parameter names)."""
        self.check_prompts(prompts)
        self.check_params(params, prefix="")
        try:
            self.check_tokens(prompts, params.max_new_tokens, max_model_len, repeats)
        except InvalidRequest as err:
            raise InvalidRequest("max_new_tokens", err.message) from None

    def grpc_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes)]


class Admission:
    """Counts engine requests admitted and not yet finished; `take(n)` refuses at once when full."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            if self.held + n > self.limit:
                raise ServerFull(f"the server is full: {self.held} requests running or queued, {n} more would "
                                 f"exceed the limit max_pending={self.limit}; retry later")
            self.held += n

    def give_back(self, n: int) -> None:
        with self._lock:
            self.held -= n

    def hold(self, n: int, context) -> None:
        """Take n slots for the life of a gRPC call (given back when it ends, however it ends)."""
        self.take(n)
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self.give_back(n)

        if not context.add_callback(release):
            release()


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = RequestLimits()
    group = p.add_argument_group("request limits")
    for name, (option, text) in _OPTIONS.items():
        group.add_argument(option, type=int, default=getattr(defaults, name), metavar="N",
                           help=f"{text} (default: %(default)s)")


def from_args(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(**{name: getattr(args, name) for name in _OPTIONS})


def to_argv(limits: RequestLimits) -> list[str]:
    """The options that rebuild `limits` in a child server (the inverse of from_args)."""
    return [arg for name, (option, _) in _OPTIONS.items() for arg in (option, str(getattr(limits, name)))]
