"""Proto <-> Python conversions for the Generation service, and request validation naming proto fields.

Every error raised here is an InvalidRequest whose field is the path of the offending proto field
(`prompts[2].token_ids[5]`, `params.top_p`), so the server can answer INVALID_ARGUMENT with it.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import InvalidRequest
from protos import tandem_pb2
from protos.names import FINISH_TO_PROTO
from serving.engine.outputs import EngineStats, RequestOutput
from serving.engine.sampling_params import SamplingParams, per_sample

Prompt = str | list[int]

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_OPTIONAL_PARAMS = ("temperature", "top_p", "seed", "max_new_tokens")
MAX_N = 64   # completions per prompt


@dataclass
class ValidRequest:
    """A GenerateRequest that passed every check: safe to hand to the engine as a whole."""

    request_id: str
    prompts: list[Prompt]           # token ids (text prompts are tokenized here, so lengths are exact)
    params: SamplingParams
    n: int = 1                      # completions per prompt

    def engine_ids(self) -> list[str]:
        """One engine request per prompt and sample: `{request_id}-{index}` (`-{index}.{sample}` when n > 1)."""
        if self.n == 1:
            return [f"{self.request_id}-{i}" for i in range(len(self.prompts))]
        return [f"{self.request_id}-{i}.{j}" for i in range(len(self.prompts)) for j in range(self.n)]

    def engine_prompts(self) -> list[Prompt]:
        """The prompts in engine-request order: each one n times in a row."""
        return [p for p in self.prompts for _ in range(self.n)]

    def engine_params(self) -> SamplingParams | list[SamplingParams]:
        """One SamplingParams for all, or, when n > 1 with a seed, sample j seeded with seed + j (so the n
        completions differ yet replay exactly)."""
        return per_sample(self.params, self.n, len(self.prompts))

    def position(self, engine_index: int) -> tuple[int, int]:
        """Engine-request index -> (prompt index, sample index)."""
        return divmod(engine_index, self.n)


def params_from_proto(msg: tandem_pb2.SamplingParams, vocab_size: int) -> SamplingParams:
    """Proto SamplingParams -> validated SamplingParams; unset optional fields keep the defaults."""
    kwargs: dict = {
        "top_k": msg.top_k,
        "min_new_tokens": msg.min_new_tokens,
        "ignore_eos": msg.ignore_eos,
        "stop_token_ids": list(msg.stop_token_ids),
        "stop": list(msg.stop),
        "top_logprobs": msg.top_logprobs,
        "priority": msg.priority,
        "logprobs_mode": msg.logprobs_mode or "raw",
    }
    for name in _OPTIONAL_PARAMS:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    if "temperature" in kwargs or "top_p" in kwargs:
        # float32 on the wire: 0.7 arrives as 0.699999988; keep what the client meant.
        for name in ("temperature", "top_p"):
            if name in kwargs:
                kwargs[name] = float(f"{kwargs[name]:.7g}")
    params = SamplingParams(**kwargs)
    try:
        params.validate()
    except InvalidRequest as err:
        raise InvalidRequest(f"params.{err.field}", err.message) from None
    for j, token_id in enumerate(params.stop_token_ids):
        if token_id >= vocab_size:
            raise InvalidRequest(f"params.stop_token_ids[{j}]",
                                 f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
    return params


def prompt_from_proto(index: int, msg: tandem_pb2.Prompt, encode: Callable[[str], list[int]],
                      vocab_size: int, max_model_len: int) -> list[int]:
    """One proto Prompt -> its token ids, checked against the vocabulary and the context length."""
    path = f"prompts[{index}]"
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest(path, "set either text or token_ids")
    if kind == "text":
        if not msg.text:
            raise InvalidRequest(f"{path}.text", "must not be empty")
        try:
            ids = list(encode(msg.text))
        except InvalidRequest as err:          # e.g. a model without a tokenizer
            raise InvalidRequest(f"{path}.text", err.message) from None
        if not ids:
            raise InvalidRequest(f"{path}.text", "tokenizes to no tokens")
    else:
        ids = list(msg.token_ids.ids)
        if not ids:
            raise InvalidRequest(f"{path}.token_ids", "must not be empty")
        for j, token_id in enumerate(ids):
            if not 0 <= token_id < vocab_size:
                raise InvalidRequest(f"{path}.token_ids.ids[{j}]",
                                     f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise InvalidRequest(path, f"prompt is longer than the model context ({len(ids)} >= {max_model_len})")
    return ids


def request_from_proto(msg: tandem_pb2.GenerateRequest, encode: Callable[[str], list[int]],
                       vocab_size: int, max_model_len: int) -> ValidRequest:
    """Validate a whole GenerateRequest before any part of it reaches the engine."""
    if not msg.prompts:
        raise InvalidRequest("prompts", "at least one prompt is required")
    params = params_from_proto(msg.params, vocab_size)
    n = msg.params.n or 1
    if not 1 <= n <= MAX_N:
        raise InvalidRequest("params.n", f"must be in [1, {MAX_N}], got {n}")
    prompts = [prompt_from_proto(i, p, encode, vocab_size, max_model_len) for i, p in enumerate(msg.prompts)]
    request_id = msg.request_id or uuid.uuid4().hex
    return ValidRequest(request_id=request_id, prompts=prompts, params=params, n=n)


def engine_error_field(err: InvalidRequest) -> InvalidRequest:
    """Re-home an engine-side refusal (serving.engine.loop.PromptRefused) onto the proto path."""
    index = getattr(err, "index", None)
    if index is None:
        return err
    if err.field in _PARAM_FIELDS:
        return InvalidRequest(f"params.{err.field}", err.message)
    if err.field.startswith("prompts") or err.field.startswith("params.") or err.field == "request_id":
        return err
    return InvalidRequest(f"prompts[{index}]", err.message)


def top_logprobs_to_proto(top: list[list[tuple[int, float]]]) -> list[tandem_pb2.TopLogprobs]:
    return [tandem_pb2.TopLogprobs(token_ids=[t for t, _ in pairs], logprobs=[lp for _, lp in pairs]) for pairs in top]


def completion_to_proto(index: int, out: RequestOutput, sample_index: int = 0) -> tandem_pb2.Completion:
    return tandem_pb2.Completion(
        index=index, text=out.text, prompt_token_ids=out.prompt_token_ids, token_ids=out.token_ids,
        logprobs=out.logprobs, finish_reason=FINISH_TO_PROTO[out.finish_reason],
        weight_version=out.weight_version, sample_index=sample_index,
        top_logprobs=top_logprobs_to_proto(out.top_logprobs))


def delta_to_proto(request_id: str, index: int, out: RequestOutput, first: bool,
                   sample_index: int = 0) -> tandem_pb2.GenerateDelta:
    """What is new in `out` since the previous delta of this index (prompt ids only on the first)."""
    return tandem_pb2.GenerateDelta(
        request_id=request_id, index=index, text=out.new_text, token_ids=out.new_token_ids,
        logprobs=out.new_logprobs, finish_reason=FINISH_TO_PROTO[out.finish_reason if out.finished else None],
        weight_version=out.weight_version, prompt_token_ids=out.prompt_token_ids if first else (),
        sample_index=sample_index, top_logprobs=top_logprobs_to_proto(out.new_top_logprobs))


def status_to_proto(stats: EngineStats, *, model: str, weight_version: int, weight_origin: str,
                    tensor_parallel: int, device: str, dtype: str, uptime_s: float,
                    instance_id: str = "") -> tandem_pb2.ServerStatus:
    return tandem_pb2.ServerStatus(
        model=model, weight_version=weight_version, weight_origin=weight_origin,
        tensor_parallel=tensor_parallel, running=stats.running, waiting=stats.waiting,
        kv_blocks_total=stats.kv_blocks_total, kv_blocks_free=stats.kv_blocks_free,
        block_size=stats.block_size, token_budget=stats.token_budget, device=device, dtype=dtype,
        uptime_s=uptime_s, requests_finished=stats.requests_finished,
        tokens_generated=stats.tokens_generated, max_model_len=stats.max_model_len, instance_id=instance_id)
