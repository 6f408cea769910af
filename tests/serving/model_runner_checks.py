"""Test helpers: a tiny greedy driver over ModelRunner (decodes and split prompt chunks mixed in each pass),
and comparisons against the HF reference model."""

from __future__ import annotations

import torch

from serving.batch import ScheduledChunk
from serving.engine.model_runner import ModelRunner


def greedy_generate(runner: ModelRunner, prompts: list[list[int]], max_new_tokens: int, chunk_size: int,
                    block_size: int, token_budget: int = 24) -> list[list[int]]:
    """Greedy continuations of `prompts`, one new sequence admitted per pass, prompts fed `chunk_size` at a time.

    Each pass carries the running sequences' decode tokens first, then prompt chunks up to `token_budget`.
    Returns the tokens and, per sequence, the logits each token was picked from."""
    blocks_per_seq = -(-(max(map(len, prompts)) + max_new_tokens) // block_size)
    runner.allocate_kv_cache(blocks_per_seq * len(prompts) + 1, block_size)
    # Interleaved, non-contiguous block ids (block 0 unused) so the block-table indexing is exercised.
    tables = [[1 + seq + k * len(prompts) for k in range(blocks_per_seq)] for seq in range(len(prompts))]
    fed = [0] * len(prompts)            # prompt tokens already in the cache
    outputs: list[list[int]] = [[] for _ in prompts]
    step_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    admitted = 0
    while any(len(o) < max_new_tokens for o in outputs):
        admitted = min(admitted + 1, len(prompts))
        chunks, owners = [], []
        for seq in range(admitted):      # decodes first
            if fed[seq] == len(prompts[seq]) and 0 < len(outputs[seq]) < max_new_tokens:
                pos = len(prompts[seq]) + len(outputs[seq]) - 1
                chunks.append(ScheduledChunk(seq, [outputs[seq][-1]], pos, tables[seq], True))
                owners.append(seq)
        budget = token_budget - len(chunks)
        for seq in range(admitted):      # then prompt chunks
            remaining = len(prompts[seq]) - fed[seq]
            if remaining == 0 or budget <= 0:
                continue
            n = min(chunk_size, remaining, budget)
            last = n == remaining
            chunks.append(ScheduledChunk(seq, prompts[seq][fed[seq]:fed[seq] + n], fed[seq], tables[seq], last))
            if last:
                owners.append(seq)
            fed[seq] += n
            budget -= n
        if not chunks:
            continue
        logits = runner.run(chunks)
        assert logits.shape == (len(owners), runner.info.vocab_size) and logits.dtype == torch.float32
        for seq, row, token in zip(owners, logits, logits.argmax(-1).tolist()):
            outputs[seq].append(token)
            step_logits[seq].append(row)
    return outputs, step_logits


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """HF `generate` greedy: the new tokens and the logits [new tokens, vocab] they were picked from."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


def check_logits(runner: ModelRunner, reference, prompt: list[int]) -> None:
    """Prompt fed in three chunks, each asking for logits: they match HF's forward at those positions."""
    runner.allocate_kv_cache(64, 4)
    table = list(range(63, 0, -1))
    cuts = [0, 5, 6, len(prompt)]
    chunks = [ScheduledChunk(0, prompt[a:b], a, table, True) for a, b in zip(cuts, cuts[1:])]
    ours = torch.cat([runner.run([c]) for c in chunks])
    with torch.no_grad():
        full = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, full[[b - 1 for b in cuts[1:]]], atol=1e-4, rtol=1e-4)
