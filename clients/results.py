"""What the clients hand back (plain dataclasses, not protos) and how requests are built from Python values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import grpc

from protos import tandem_pb2
from protos.names import FINISH_FROM_PROTO

PromptLike = str | Sequence[int]

PARAM_NAMES = ("temperature", "top_p", "top_k", "seed", "max_new_tokens", "min_new_tokens",
               "ignore_eos", "stop_token_ids", "stop", "logprobs_mode")


class TandemError(RuntimeError):
    """A failed call: the gRPC status code, the server's message and the server it came from."""

    def __init__(self, target: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{target}: {code.name}: {details}")
        self.target = target
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, target: str, err: grpc.RpcError) -> TandemError:
        return cls(target, err.code(), err.details() or "")


@dataclass
class Completion:
    index: int
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None      # "stop" | "length" | "abort"
    weight_version: int

    @classmethod
    def from_proto(cls, msg: tandem_pb2.Completion) -> Completion:
        return cls(index=msg.index, text=msg.text, prompt_token_ids=list(msg.prompt_token_ids),
                   token_ids=list(msg.token_ids), logprobs=list(msg.logprobs),
                   finish_reason=FINISH_FROM_PROTO[msg.finish_reason], weight_version=msg.weight_version)


@dataclass
class Experience:
    """One sample of a rollout (StreamExperience), with the logprobs of the policy that sampled it: under its
    raw distribution, or the processed one it sampled from when the request set logprobs_mode="processed"."""
    rollout_id: str
    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    behaviour_logprobs: list[float]
    finish_reason: str | None
    weight_version: int
    response_text: str
    instance_id: str = ""           # the server process that made it

    @classmethod
    def from_proto(cls, msg: tandem_pb2.Experience) -> Experience:
        return cls(rollout_id=msg.rollout_id, prompt_index=msg.prompt_index, sample_index=msg.sample_index,
                   prompt_token_ids=list(msg.prompt_token_ids), response_token_ids=list(msg.response_token_ids),
                   behaviour_logprobs=list(msg.behaviour_logprobs),
                   finish_reason=FINISH_FROM_PROTO[msg.finish_reason], weight_version=msg.weight_version,
                   response_text=msg.response_text, instance_id=msg.instance_id)


@dataclass
class Delta:
    """What one stream step adds to a completion; `finish_reason` is set on the last delta only."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    weight_version: int
    prompt_token_ids: list[int] = field(default_factory=list)   # on the first delta only

    @classmethod
    def from_proto(cls, msg: tandem_pb2.GenerateDelta) -> Delta:
        return cls(request_id=msg.request_id, index=msg.index, text=msg.text, token_ids=list(msg.token_ids),
                   logprobs=list(msg.logprobs), finish_reason=FINISH_FROM_PROTO[msg.finish_reason],
                   weight_version=msg.weight_version, prompt_token_ids=list(msg.prompt_token_ids))


@dataclass
class Status:
    model: str
    weight_version: int
    weight_origin: str
    tensor_parallel: int
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    block_size: int
    token_budget: int
    device: str
    dtype: str
    uptime_s: float
    requests_finished: int
    tokens_generated: int
    max_model_len: int
    instance_id: str = ""           # random per server process: a new one means the server was restarted

    @classmethod
    def from_proto(cls, msg: tandem_pb2.ServerStatus) -> Status:
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})


def normalize_prompts(prompts: PromptLike | Sequence[PromptLike]) -> list[PromptLike]:
    """A str or a list of ints is one prompt; any other sequence is a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]
    return prompts


def prompt_to_proto(prompt: PromptLike) -> tandem_pb2.Prompt:
    if isinstance(prompt, str):
        return tandem_pb2.Prompt(text=prompt)
    return tandem_pb2.Prompt(token_ids=tandem_pb2.TokenIds(ids=[int(t) for t in prompt]))


def params_to_proto(params: dict) -> tandem_pb2.SamplingParams:
    """Keyword sampling options -> proto; None means "the server's default"."""
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)} (known: {', '.join(PARAM_NAMES)})")
    msg = tandem_pb2.SamplingParams()
    for name, value in params.items():
        if value is None:
            continue
        if name in ("stop_token_ids", "stop"):
            getattr(msg, name).extend([value] if isinstance(value, (str, int)) else value)
        else:
            setattr(msg, name, value)
    return msg


def build_rollout_request(prompts: PromptLike | Sequence[PromptLike], params: dict, samples_per_prompt: int = 1,
                          rollout_id: str = "") -> tandem_pb2.RolloutRequest:
    return tandem_pb2.RolloutRequest(prompts=[prompt_to_proto(p) for p in normalize_prompts(prompts)],
                                     params=params_to_proto(params), samples_per_prompt=samples_per_prompt,
                                     rollout_id=rollout_id)


def build_request(prompts: PromptLike | Sequence[PromptLike], params: dict,
                  request_id: str = "") -> tandem_pb2.GenerateRequest:
    return tandem_pb2.GenerateRequest(prompts=[prompt_to_proto(p) for p in normalize_prompts(prompts)],
                                      params=params_to_proto(params), request_id=request_id)
