"""OpenAI request bodies -> what the engine runs, checked once; every refusal names the OpenAI parameter.

`completion_plan` reads a `POST /v1/completions` body, `chat_plan` a `POST /v1/chat/completions` body.
Both return a `Plan` (token-id prompts, one SamplingParams, n, streaming and logprob options) or raise
`OpenAIError(400, ..., param=...)`. Unknown keys are ignored, as OpenAI's own clients send extras;
options tandem does not implement are refused when set to anything but their neutral value.
vLLM's extensions `top_k`, `min_tokens`, `ignore_eos`, `stop_token_ids` and `priority` are accepted, and
`logprobs_mode` ("raw" | "processed": per request here, where vLLM has a server-wide `--logprobs-mode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.errors import InvalidRequest
from serving.engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from serving.http.chat_template import render_chat

MAX_N = 64
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# SamplingParams field -> the OpenAI parameter that set it
COMPLETION_PARAM = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "top_logprobs": "logprobs"}
CHAT_PARAM = {"max_new_tokens": "max_completion_tokens", "min_new_tokens": "min_tokens", "top_logprobs": "top_logprobs",
              "prompt": "messages"}
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None, "tools": None,
           "tool_choice": None, "functions": None, "function_call": None}


class OpenAIError(Exception):
    """An error answered as OpenAI's error object with HTTP `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param)


@dataclass
class Plan:
    prompts: list[list[int]]                    # token ids, one per prompt
    prompt_texts: list[str]                     # what echo prepends
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None                 # None: not asked; k >= 0: the sampled token's + k alternatives
    echo: bool = False
    param_names: dict = field(default_factory=dict)   # SamplingParams field -> OpenAI parameter

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def openai_param(self, engine_field: str) -> str:
        return self.param_names.get(engine_field, engine_field)


class Codec:
    """The tokenizer seen from the front: encode, decode one token, render chat; `lock` guards it."""

    def __init__(self, tokenizer, lock, vocab_size: int, max_model_len: int):
        self.tokenizer, self.lock, self.vocab_size, self.max_model_len = tokenizer, lock, vocab_size, max_model_len
        self._token_text: dict[int, str] = {}
        self._anchor: tuple[list[int], str] | None = None     # see _in_context

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("prompt", "text prompts need a tokenizer and the model has none: send token ids")
        with self.lock:
            return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        with self.lock:
            return self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        """The text a token adds after another token, as it reads inside a completion (its leading space kept:
        a SentencePiece tokenizer decodes "▁home" alone as "home"), so a choice's logprob tokens join into
        its text; decoded after an anchor token and cut after the anchor's own text."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self._in_context(token_id) if self.tokenizer is not None \
                else str(token_id)
        return text

    def _in_context(self, token_id: int) -> str:
        if self._anchor is None:
            anchor = self.encode("a")[-1:]
            self._anchor = (anchor, self.decode(anchor))
        anchor, anchor_text = self._anchor
        pair = self.decode(anchor + [token_id])
        return pair[len(anchor_text):] if anchor and pair.startswith(anchor_text) else self.decode([token_id])

    def chat(self, messages: list[dict]) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            raise bad("messages", "chat needs a tokenizer and the model has none")
        with self.lock:
            return render_chat(self.tokenizer, messages)


# ---------------------------------------------------------------- scalar checks

def _number(body: dict, name: str, default, low: float, high: float, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise bad(name, f"must be a number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise bad(name, f"must be in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return float(value)


def _int(body: dict, name: str, default, low: int | None = None, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(name, f"must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise bad(name, f"must be in {bounds}, got {value}")
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {value!r}")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", f"must be a non-empty string or a list of them, got {stop!r}")
    return stops


def _common(body: dict) -> dict:
    """Options both endpoints share, as SamplingParams keyword arguments (plus n, stream, include_usage)."""
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value not in (None, neutral) and value != {} and value != []:
            raise bad(name, "is not supported by this server")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad("model", "a model name is required (see GET /v1/models)")
    n = _int(body, "n", 1, 1, MAX_N)
    best_of = _int(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise bad("best_of", f"only best_of == n is supported, got best_of={best_of}, n={n}")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad("stream_options", "must be an object, and only with stream: true")
    include_usage = bool(options and _bool(options, "include_usage"))
    top_k = _int(body, "top_k", 0, -1)
    stop_token_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in stop_token_ids):
        raise bad("stop_token_ids", f"must be a list of token ids, got {stop_token_ids!r}")
    kwargs = dict(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                  top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                  top_k=max(top_k, 0), seed=_int(body, "seed", None, 0),
                  min_new_tokens=_int(body, "min_tokens", 0, 0), ignore_eos=_bool(body, "ignore_eos"),
                  stop=_stop(body), stop_token_ids=stop_token_ids, priority=_int(body, "priority", 0),
                  logprobs_mode="raw" if body.get("logprobs_mode") is None else body["logprobs_mode"])
    return {"kwargs": kwargs, "n": n, "stream": stream, "include_usage": include_usage}


def _check_ids(ids: list[int], codec: Codec, param: str) -> list[int]:
    if not ids:
        raise bad(param, "must not be empty")
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < codec.vocab_size:
            raise bad(param, f"token ids must be integers in [0, {codec.vocab_size}), got {t!r}")
    if len(ids) >= codec.max_model_len:
        raise bad(param, f"{len(ids)} tokens leave no room in the context of {codec.max_model_len} tokens")
    return ids


def _params(kwargs: dict, names: dict) -> SamplingParams:
    params = SamplingParams(**kwargs)
    try:
        params.validate()
    except InvalidRequest as err:
        raise bad(names.get(err.field, err.field), err.message) from None
    return params


# ---------------------------------------------------------------- the two endpoints

def completion_plan(body: dict, codec: Codec) -> Plan:
    common = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "must be a string, a list of strings, a list of token ids or a list of those")
    prompts, texts = [], []
    for item in prompt:
        if isinstance(item, str):
            if not item:
                raise bad("prompt", "must not be empty")
            try:
                ids = codec.encode(item)
            except InvalidRequest as err:
                raise bad("prompt", err.message) from None
            prompts.append(_check_ids(ids, codec, "prompt"))
            texts.append(item)
        elif isinstance(item, list):
            prompts.append(_check_ids(item, codec, "prompt"))
            texts.append(codec.decode(item))
        else:
            raise bad("prompt", f"each prompt must be a string or a list of token ids, got {item!r}")
    logprobs = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    echo = _bool(body, "echo")
    if echo and logprobs is not None:
        raise bad("echo", "echo with logprobs (prompt logprobs) is not supported")
    kwargs = common["kwargs"]
    kwargs.update(max_new_tokens=_int(body, "max_tokens", 16, 1), top_logprobs=logprobs or 0)
    return Plan(prompts=prompts, prompt_texts=texts, params=_params(kwargs, COMPLETION_PARAM), n=common["n"],
                stream=common["stream"], include_usage=common["include_usage"], logprobs=logprobs, echo=echo,
                param_names=COMPLETION_PARAM)


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):          # content parts: only text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content", "only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def chat_plan(body: dict, codec: Codec) -> Plan:
    common = _common(body)
    messages = chat_messages(body)
    text, ids = codec.chat(messages)
    _check_ids(ids, codec, "messages")
    want_logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not want_logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    names = dict(CHAT_PARAM)
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
        names["max_new_tokens"] = "max_tokens"
    if max_tokens is None:
        max_tokens = codec.max_model_len - len(ids)      # as vLLM: the rest of the context
    kwargs = common["kwargs"]
    kwargs.update(max_new_tokens=max_tokens, top_logprobs=top or 0)
    return Plan(prompts=[ids], prompt_texts=[text], params=_params(kwargs, names), n=common["n"],
                stream=common["stream"], include_usage=common["include_usage"],
                logprobs=(top or 0) if want_logprobs else None, param_names=names)
