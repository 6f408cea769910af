"""The engine: requests in, one scheduler step + one forward pass per `step()`, outputs out.

Driven from a single thread (the server's engine loop, or `generate` offline):
schedule -> model runner -> sample -> append -> detokenize / stop checks -> free finished
sequences' blocks -> an output for every sequence that produced a token this step.

KV cache size: `config.num_kv_blocks` when > 0; otherwise, on CUDA, 85% of the free GPU memory
after loading the model; on CPU, room for min(max_num_seqs, 32) sequences of max_model_len tokens.
"""

from __future__ import annotations

import logging
import math

import torch

from common.errors import InvalidRequest
from common.progress import progress as progress_bar
from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.guards import check_allowed_set, sample_isolated
from serving.engine.outputs import EngineStats, RequestOutput
from serving.engine.sampler import Sampler
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from serving.engine.sequence import Sequence

logger = logging.getLogger(__name__)

CUDA_KV_FRACTION = 0.85   # of the free GPU memory after the weights are loaded
CPU_KV_SEQS = 32          # full-length sequences the default CPU cache holds (capped by max_num_seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, kv_reserve: str = "worst_case", runner=None):
        from serving.engine.model_runner import ModelRunner

        self.config = config.validate()
        self.runner = runner if runner is not None else ModelRunner(config)   # e.g. serving.parallel.runner.TPModelRunner
        self.info = self.runner.info
        self.tokenizer = self.runner.tokenizer
        self.max_model_len = self.info.max_model_len
        num_blocks = self._num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks, config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.token_budget, config.max_num_seqs, self.max_model_len,
                                                   kv_reserve, config.scheduling), self.block_manager)
        self.sampler = Sampler(self.info.eos_token_ids)
        self.weight_version = 0
        self.weight_origin = config.model
        self.requests: dict[str, Sequence] = {}
        self.requests_finished = 0
        self.tokens_generated = 0
        self.last_schedule: SchedulerOutput | None = None    # the latest pass (tests check invariants on it)
        self._next_seq_id = 0
        self._unseeded = 0
        logger.info("engine: %s, %d KV blocks of %d tokens, token budget %d, max_model_len %d",
                    self.info.architecture, num_blocks, config.block_size, config.token_budget, self.max_model_len)

    def _num_kv_blocks(self) -> int:
        bs = self.config.block_size
        if self.config.num_kv_blocks > 0:
            return self.config.num_kv_blocks
        device = torch.device(self.info.device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return max(1, int(free * CUDA_KV_FRACTION) // self.runner.kv_cache_bytes_per_block(bs))
        return min(self.config.max_num_seqs, CPU_KV_SEQS) * math.ceil(self.max_model_len / bs)

    # ------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Validate and queue a request; raises InvalidRequest naming the bad field."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest("request_id", "must be a non-empty string")
        if request_id in self.requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        params.validate()
        check_allowed_set(params, self.info.eos_token_ids, self.info.vocab_size)
        prompt_ids = self._prompt_ids(prompt)
        seed = params.seed
        if seed is None:
            seed = (self.config.seed * 1_000_003 + self._unseeded) % (1 << 63)
            self._unseeded += 1
        generator = torch.Generator().manual_seed(seed)
        seq = Sequence(self._next_seq_id, request_id, prompt_ids, params, generator, self.max_model_len,
                       self.block_manager.block_size)
        if seq.max_blocks > self.block_manager.num_blocks:
            raise InvalidRequest("max_new_tokens", f"prompt + max_new_tokens needs {seq.max_blocks} KV blocks but "
                                                   f"the cache has {self.block_manager.num_blocks}")
        self._next_seq_id += 1
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop)
        elif params.stop:
            raise InvalidRequest("stop", "stop strings need a tokenizer and the model has none")
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt, exactly as add_request tokenizes it."""
        if self.tokenizer is None:
            raise InvalidRequest("prompt", "text prompts need a tokenizer and the model has none: send token ids")
        return list(self.tokenizer.encode(text))

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "must not be empty")
            ids = self.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.info.vocab_size
            for t in ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise InvalidRequest("prompt", f"token ids must be integers in [0, {vocab}), got {t!r}")
        if not ids:
            raise InvalidRequest("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest("prompt", f"{len(ids)} tokens leave no room in the context of "
                                           f"{self.max_model_len} tokens")
        return ids

    def abort_request(self, request_id: str) -> None:
        """Drop a request (unknown or finished ids are ignored); its KV blocks are freed at once."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks (after new weights); running sequences stop registering theirs."""
        self.block_manager.reset_prefix_cache()
        for seq in self.scheduler.running:
            seq.prefix_caching = False

    # ------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.last_schedule = batch
        if not batch.chunks:
            return []
        logits = self.runner.run(batch.chunks)
        sampling: list[Sequence] = []
        for chunk, seq in zip(batch.chunks, batch.seqs):
            seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.cache_full_blocks(seq)
            if chunk.needs_logits:
                sampling.append(seq)
        if not sampling:
            return []
        token_ids, logprobs, top, failed = sample_isolated(self.sampler, logits, sampling)
        outputs = []
        for i, (seq, token_id, logprob) in enumerate(zip(sampling, token_ids, logprobs)):
            if i in failed:                          # this request's numbers, not the engine: end it alone
                outputs.append(self._end_aborted(seq, failed[i]))
                continue
            try:
                seq.append_token(token_id, logprob)
                if seq.params.top_logprobs:
                    seq.output_top_logprobs.append(top[i][:seq.params.top_logprobs])
                self.tokens_generated += 1
                self._check_finish(seq, token_id)
                out = self._output(seq)
            except Exception as err:  # noqa: BLE001 - detokenizing / stop matching failed for this request only
                logger.warning("request %s failed after sampling: %s: %s", seq.request_id, type(err).__name__, err)
                outputs.append(self._end_aborted(seq, f"{type(err).__name__}: {err}"))
                continue
            outputs.append(out)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                self.requests.pop(seq.request_id, None)
                self.requests_finished += 1
        return outputs

    def _end_aborted(self, seq: Sequence, error: str) -> RequestOutput:
        """Finish one request as "abort" with `error` (its KV blocks are freed); the engine goes on."""
        seq.finish_reason = "abort"
        start = seq.num_emitted_tokens
        seq.num_emitted_tokens = seq.num_output_tokens
        detok = seq.detokenizer
        text = detok.text[:detok.emitted] if detok is not None else ""
        self.scheduler.finish(seq)
        self.requests.pop(seq.request_id, None)
        self.requests_finished += 1
        return RequestOutput(request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                             new_token_ids=seq.output_token_ids[start:], new_logprobs=seq.output_logprobs[start:],
                             new_text="", token_ids=list(seq.output_token_ids), logprobs=list(seq.output_logprobs),
                             text=text, finished=True, finish_reason="abort", weight_version=self.weight_version,
                             error=error)

    def abort_all(self, error: str) -> list[RequestOutput]:
        """Finish every request in the engine as "abort" with `error` (e.g. stragglers of a weight swap)."""
        return [self._end_aborted(seq, error) for seq in list(self.requests.values())]

    def _check_finish(self, seq: Sequence, token_id: int) -> None:
        p = seq.params
        reason = None
        text_ids = [token_id]
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.info.eos_token_ids):
            reason, text_ids = "stop", []             # the stop token is in token_ids, not in the text
        elif seq.num_output_tokens >= p.max_new_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        detok = seq.detokenizer
        if detok is not None:
            detok.add_tokens(text_ids, check_stop=seq.num_output_tokens >= p.min_new_tokens)
            if detok.stopped:
                reason = "stop"
            elif reason is not None:
                detok.flush()
        seq.finish_reason = reason

    def _output(self, seq: Sequence) -> RequestOutput:
        start = seq.num_emitted_tokens
        seq.num_emitted_tokens = seq.num_output_tokens
        finished = seq.finish_reason is not None
        detok = seq.detokenizer
        new_text = detok.take_delta(finished) if detok is not None else ""
        text = detok.text[:detok.emitted] if detok is not None else ""
        return RequestOutput(request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                             new_token_ids=seq.output_token_ids[start:], new_logprobs=seq.output_logprobs[start:],
                             new_text=new_text, token_ids=list(seq.output_token_ids),
                             logprobs=list(seq.output_logprobs), text=text, finished=finished,
                             finish_reason=seq.finish_reason, weight_version=self.weight_version,
                             new_top_logprobs=seq.output_top_logprobs[start:],
                             top_logprobs=list(seq.output_top_logprobs))

    # ------------------------------------------------------------ status and offline use

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           kv_blocks_total=self.block_manager.num_blocks,
                           kv_blocks_free=self.block_manager.num_free_blocks,
                           block_size=self.block_manager.block_size, token_budget=self.config.token_budget,
                           requests_finished=self.requests_finished, tokens_generated=self.tokens_generated,
                           max_model_len=self.max_model_len)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 progress: bool = False) -> list[RequestOutput]:
        """Offline helper: run the prompts to completion; final outputs in prompt order."""
        if self.has_unfinished_requests():
            raise RuntimeError("generate() needs an idle engine: other requests are in flight")
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequest("params", f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids = [f"generate-{self._next_seq_id}-{i}" for i in range(len(prompts))]
        try:
            for rid, prompt, p in zip(ids, prompts, params_list):
                self.add_request(rid, prompt, p)
            final: dict[str, RequestOutput] = {}
            with progress_bar(total=len(prompts), disable=not progress, desc="generate") as bar:
                while self.has_unfinished_requests():
                    for out in self.step():
                        if out.finished:
                            final[out.request_id] = out
                            bar.update(1)
        finally:
            for rid in ids:
                self.abort_request(rid)
        return [final[rid] for rid in ids]
