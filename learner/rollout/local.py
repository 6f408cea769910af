"""Where step 3 gets its responses: a rollout source turns prompt ids into finished responses.

`LocalRolloutSource` samples with HF `generate` on the actor inside the learner (DeepSpeed-Chat without
its hybrid engine). Under ZeRO-3 a small actor is copied, unpartitioned, into a generation copy before each
rollout; a large one is gathered once for the whole `generate` call (synced across ranks). The remote
source (the generation server, issue 4) implements the same protocol from the server's Experience stream:
behaviour logprobs and the weight version come with each response.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from learner import ds
from learner.ppo.math import logprobs_from_logits
from learner.ppo.processing import processing_for

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """How to sample rollouts (the subset of serving's SamplingParams that PPO needs)."""

    max_new_tokens: int = 64
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_new_tokens: int = 0             # no EOS before this many tokens
    ignore_eos: bool = False            # every response runs to max_new_tokens (as DeepSpeed-Chat's fixed-length rollouts)
    logprobs_mode: str = "raw"          # the behaviour logprobs' distribution: raw | processed (learner.ppo.processing)


@dataclass
class Rollout:
    """One finished response. `logprobs` are behaviour logprobs, one per response token: log p(token) under
    the weights that produced it, in the distribution the learner's ratios are over (its SamplingParams'
    logprobs_mode): the raw one (temperature 1, no top-k/p), or the processed one it was sampled from."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str                  # "stop" (EOS) | "length"
    weight_version: int = 0
    text: str = ""
    meta: dict = field(default_factory=dict)


class RolloutSource(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, samples_per_prompt: int = 1) -> list[Rollout]:
        """`samples_per_prompt` Rollouts per prompt, prompt-major in the order of `prompts`."""
        ...


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], str]:
    """The response up to and including its first EOS, and the finish reason."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1], "stop"
    return tokens, "length"


COPY_MAX_PARAMS = 300_000_000


class GenerationCopy:
    """An unpartitioned copy of a ZeRO-3 actor for `generate`, refreshed from the engine (gathered one module
    at a time, LoRA fused) before each rollout: decoding then pays no per-token parameter gathering, the
    cost DeepSpeed-Chat's hybrid engine removes. Used for models up to COPY_MAX_PARAMS parameters."""

    def __init__(self, config, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(ds.device()).eval()
        self.model.requires_grad_(False)

    @classmethod
    def for_actor(cls, actor, max_params: int) -> GenerationCopy | None:
        module = ds.unwrap(actor)
        params = list(module.parameters())
        if not any(hasattr(p, "ds_id") for p in params):
            return None
        if sum(p.ds_numel for p in params) > max_params or not hasattr(module, "config"):
            return None
        return cls(module.config, params[0].dtype)

    @torch.no_grad()
    def refresh(self, actor) -> None:
        from learner.checkpoint import gather_state_dict

        state = gather_state_dict(ds.unwrap(actor), keep=True)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"generation copy: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")


class LocalRolloutSource:
    """HF `generate` on the actor (a DeepSpeedEngine or a plain model) in this process."""

    def __init__(self, actor, tokenizer, weight_version: int = 0, copy_max_params: int = COPY_MAX_PARAMS):
        self.actor, self.tokenizer, self.weight_version = actor, tokenizer, weight_version
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        self.copy = GenerationCopy.for_actor(actor, copy_max_params)

    def _model(self) -> tuple[torch.nn.Module, bool]:
        """The module to generate with, and whether its parameters are ZeRO-3 partitioned."""
        if self.copy is not None:
            self.copy.refresh(self.actor)
            return self.copy.model, False
        model = ds.unwrap(self.actor)
        return model, any(hasattr(p, "ds_id") for p in model.parameters())

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, samples_per_prompt: int = 1) -> list[Rollout]:
        import deepspeed

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        prompts = [p for p in prompts for _ in range(samples_per_prompt)]     # prompt-major, as the server
        model, partitioned = self._model()
        device = ds.device()
        input_ids, attention_mask = left_pad(prompts, self.tokenizer.pad_token_id, device)
        sample = params.temperature > 0
        least = params.max_new_tokens if params.ignore_eos else params.min_new_tokens
        kwargs = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=least or None, do_sample=sample, use_cache=True,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=list(self.eos_ids) or None,
                      return_dict_in_generate=True, output_logits=True,
                      synced_gpus=partitioned and ds.world_size() > 1)  # ranks stop together under ZeRO-3
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        was_training = model.training
        model.eval()
        generator_state = None
        if params.seed is not None:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(params.seed)
        try:
            with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=partitioned):
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            if generator_state is not None:
                torch.random.set_rng_state(generator_state)
            model.train(was_training)
        new_tokens = out.sequences[:, input_ids.shape[1]:]
        logits = torch.stack(out.logits, dim=1)                      # [B, N, V] raw, before any warper
        processing = processing_for(params)
        # processed: scored as the learner scores its ratios (the same function on the same raw logits), so a
        # fresh local rollout's behaviour logprobs equal the learner's old ones
        logprobs = (logprobs_from_logits(logits, new_tokens) if processing is None
                    else processing.logprobs(logits, new_tokens)).cpu()
        rollouts = []
        for row, prompt in enumerate(prompts):
            tokens, reason = cut_at_eos(new_tokens[row].tolist(), self.eos_ids)
            rollouts.append(Rollout(prompt_ids=list(prompt), response_ids=tokens,
                                    logprobs=logprobs[row, : len(tokens)].tolist(), finish_reason=reason,
                                    weight_version=self.weight_version,
                                    text=self.tokenizer.decode(tokens, skip_special_tokens=True)))
        return rollouts
