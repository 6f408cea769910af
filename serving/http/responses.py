"""Engine outputs -> OpenAI response objects: completions and chat completions, whole or as stream chunks.

Choice `index` is prompt_index * n + sample, as OpenAI numbers them (the engine-request order).
`system_fingerprint` carries the weight version that produced the tokens (`tandem-weights-v3`).
"""

from __future__ import annotations

import json
import time

from serving.engine.outputs import RequestOutput
from serving.http.protocol import Codec, Plan


def fingerprint(weight_version: int) -> str:
    return f"tandem-weights-v{weight_version}"


def usage(plan: Plan, finals: list[RequestOutput | None] | None = None, generated: int | None = None) -> dict:
    prompt = sum(len(p) for p in plan.prompts)
    completion = generated if generated is not None else sum(len(f.token_ids) for f in finals if f is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(codec: Codec, ids, logprobs, tops, offset: int) -> dict:
    tokens = [codec.token_text(t) for t in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top = [{codec.token_text(t): lp for t, lp in pairs} for pairs in tops] if tops else None
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(codec: Codec, ids, logprobs, tops) -> dict:
    def entry(t, lp):
        text = codec.token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for k, (t, lp) in enumerate(zip(ids, logprobs)):
        item = entry(t, lp)
        item["top_logprobs"] = [entry(a, alp) for a, alp in tops[k]] if k < len(tops) else []
        content.append(item)
    return {"content": content}


class ResponseBuilder:
    """Builds the objects of one request (one id, one `created`)."""

    def __init__(self, plan: Plan, codec: Codec, model: str, request_id: str, chat: bool):
        self.plan, self.codec, self.model, self.id, self.chat = plan, codec, model, request_id, chat
        self.created = int(time.time())
        self._offsets = [0] * plan.num_choices

    def _head(self, obj: str, version: int) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": fingerprint(version)}

    def final(self, finals: list[RequestOutput]) -> dict:
        version = max(f.weight_version for f in finals)
        choices = []
        for index, out in enumerate(finals):
            if self.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": out.text},
                          "logprobs": None, "finish_reason": out.finish_reason}
                if self.plan.logprobs is not None:
                    choice["logprobs"] = chat_logprobs(self.codec, out.token_ids, out.logprobs, out.top_logprobs)
            else:
                prefix = self.plan.prompt_texts[index // self.plan.n] if self.plan.echo else ""
                choice = {"index": index, "text": prefix + out.text, "logprobs": None,
                          "finish_reason": out.finish_reason}
                if self.plan.logprobs is not None:
                    choice["logprobs"] = completion_logprobs(self.codec, out.token_ids, out.logprobs,
                                                             out.top_logprobs, len(prefix))
            choices.append(choice)
        body = self._head("chat.completion" if self.chat else "text_completion", version)
        body.update(choices=choices, usage=usage(self.plan, finals))
        return body

    def chunk(self, index: int, out: RequestOutput, first: bool) -> dict:
        """The stream chunk for what is new in `out` (chat: the first one carries the role)."""
        finish = out.finish_reason if out.finished else None
        if self.chat:
            delta = {"role": "assistant", "content": out.new_text} if first else {"content": out.new_text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if self.plan.logprobs is not None:
                choice["logprobs"] = chat_logprobs(self.codec, out.new_token_ids, out.new_logprobs, out.new_top_logprobs)
        else:
            text = out.new_text
            if first and self.plan.echo:
                text = self.plan.prompt_texts[index // self.plan.n] + text
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            if self.plan.logprobs is not None:
                offset = self._offsets[index] + (len(text) - len(out.new_text))
                choice["logprobs"] = completion_logprobs(self.codec, out.new_token_ids, out.new_logprobs,
                                                         out.new_top_logprobs, offset)
            self._offsets[index] += len(text)
        body = self._head("chat.completion.chunk" if self.chat else "text_completion", out.weight_version)
        body["choices"] = [choice]
        if self.plan.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, generated: int, version: int) -> dict:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion", version)
        body.update(choices=[], usage=usage(self.plan, generated=generated))
        return body


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
