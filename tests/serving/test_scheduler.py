"""The Dynamic SplitFuse scheduler on its own (it needs no model): budgets, ordering, admission, preemption.

`drive` plays the engine's bookkeeping after each pass (tokens computed, one token appended per
chunk that needs logits, finished sequences retired), so whole workloads run through the real
scheduler and block manager. Engine-level runs with a real model are in test_engine.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from common.errors import ConfigError
from serving.engine.block_manager import BlockManager
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerConfig
from serving.engine.sequence import Sequence, SequenceStatus

BS = 4


def make_scheduler(num_blocks: int, budget: int, reserve: str = "worst_case", max_num_seqs: int = 64,
                   max_model_len: int = 256, prefix: bool = True, scheduling: str = "splitfuse") -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_num_seqs, max_model_len, reserve, scheduling),
                     BlockManager(num_blocks, BS, enable_prefix_caching=prefix))


def make_seq(seq_id: int, prompt_len: int, max_new: int, first_token: int = 0) -> Sequence:
    prompt = [(first_token + seq_id * 7 + i) % 1000 for i in range(prompt_len)]
    return Sequence(seq_id, f"r{seq_id}", prompt, SamplingParams(max_new_tokens=max_new),
                    torch.Generator(), max_model_len=256, block_size=BS)


def drive(sched: Scheduler, seqs: list[Sequence], max_passes: int = 10_000) -> list:
    """Run to completion, checking invariants after every pass; return the passes."""
    for s in seqs:
        sched.add(s)
    passes = []
    while sched.has_unfinished():
        assert len(passes) < max_passes, "no progress: the scheduler is stuck"
        decoding = {s.seq_id for s in sched.running if s.is_decoding}
        out = sched.schedule()
        passes.append(out)
        assert out.chunks, "a pass with unfinished requests scheduled nothing"
        assert out.num_tokens <= sched.config.token_budget
        decode_ids = [c.seq_id for c in out.chunks[:out.num_decode_chunks]]
        assert all(c.num_tokens == 1 and c.needs_logits for c in out.chunks[:out.num_decode_chunks])
        preempted = {s.seq_id for s in out.preempted}
        if sched.config.scheduling == "splitfuse":
            assert set(decode_ids) == decoding - preempted, "every decoding sequence gets its token first"
        else:
            assert out.num_decode_chunks in (0, len(out.chunks)), "separate: decodes or prompts, never both"
        for chunk, seq in zip(out.chunks, out.seqs):
            assert chunk.start_pos == seq.num_computed_tokens
            assert len(chunk.block_table) * BS >= chunk.start_pos + chunk.num_tokens
            seq.num_computed_tokens += chunk.num_tokens
            sched.block_manager.cache_full_blocks(seq)
            if chunk.needs_logits:
                seq.append_token(seq.seq_id % 50, 0.0)
                if seq.num_output_tokens >= seq.params.max_new_tokens:
                    sched.finish(seq)
        sched.block_manager.assert_consistent(sched.running)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return passes


def test_long_prompts_are_split_and_short_ones_packed():
    sched = make_scheduler(num_blocks=64, budget=16)
    long, short1, short2 = make_seq(0, 40, 3), make_seq(1, 5, 3), make_seq(2, 6, 3)
    passes = drive(sched, [long, short1, short2])
    first, second, third = passes[:3]
    assert [(c.seq_id, c.num_tokens) for c in first.chunks] == [(0, 16)]
    assert [(c.seq_id, c.num_tokens) for c in second.chunks] == [(0, 16)]
    # the long prompt's last 8 tokens, then both short prompts packed into the same pass... up to the budget
    assert [(c.seq_id, c.num_tokens) for c in third.chunks] == [(0, 8), (1, 5), (2, 3)]
    assert third.chunks[0].needs_logits and third.chunks[1].needs_logits and not third.chunks[2].needs_logits
    # next pass: two decodes first, then the rest of the split short prompt
    assert [(c.seq_id, c.num_tokens) for c in passes[3].chunks] == [(0, 1), (1, 1), (2, 3)]
    assert all(s.status is SequenceStatus.FINISHED for s in (long, short1, short2))


def test_random_workload_respects_budget_order_and_frees_everything():
    rng = random.Random(0)
    seqs = [make_seq(i, rng.randint(1, 90), rng.randint(1, 40)) for i in range(40)]
    sched = make_scheduler(num_blocks=60, budget=24, max_num_seqs=8)
    passes = drive(sched, seqs)
    assert all(len(s.output_token_ids) == s.params.max_new_tokens for s in seqs)
    assert max(len(p.chunks[:p.num_decode_chunks]) for p in passes) <= 8
    assert sched.num_preemptions == 0


def test_admission_control_burst_larger_than_the_cache_never_runs_out():
    # each request's worst case is 8 blocks; 30 of them need 240 blocks, the cache has 20
    seqs = [make_seq(i, 20, 12) for i in range(30)]
    sched = make_scheduler(num_blocks=20, budget=32)
    admitted_order = []
    for s in seqs:
        sched.add(s)
    while sched.has_unfinished():
        out = sched.schedule()
        for seq in out.seqs:
            if seq.seq_id not in admitted_order:
                admitted_order.append(seq.seq_id)
        assert sched.reserved_blocks() <= sched.block_manager.num_free_blocks
        for chunk, seq in zip(out.chunks, out.seqs):
            seq.num_computed_tokens += chunk.num_tokens
            if chunk.needs_logits:
                seq.append_token(1, 0.0)
                if seq.num_output_tokens >= seq.params.max_new_tokens:
                    sched.finish(seq)
    assert admitted_order == list(range(30)), "FCFS admission"
    assert sched.num_preemptions == 0
    assert sched.block_manager.num_free_blocks == 20


def test_overcommit_mode_preempts_by_recompute_and_completes():
    seqs = [make_seq(i, 10, 30) for i in range(6)]      # worst case 10 blocks each, cache 16
    sched = make_scheduler(num_blocks=16, budget=32, reserve="none")
    drive(sched, seqs)
    assert sched.num_preemptions > 0
    assert any(s.num_preemptions for s in seqs)
    assert all(len(s.output_token_ids) == 30 for s in seqs)


def test_preempted_sequence_recomputes_prompt_and_generated_tokens():
    sched = make_scheduler(num_blocks=32, budget=64, reserve="none", prefix=False)
    a, b = make_seq(0, 6, 20), make_seq(1, 6, 20)
    sched.add(a)
    sched.add(b)
    for _ in range(4):
        out = sched.schedule()
        for chunk, seq in zip(out.chunks, out.seqs):
            seq.num_computed_tokens += chunk.num_tokens
            if chunk.needs_logits:
                seq.append_token(5, 0.0)
    assert b.num_output_tokens == 4
    sched.preempt(b)
    assert b.status is SequenceStatus.WAITING and sched.waiting[0] is b and b.block_table == []
    out = sched.schedule()
    chunk = next(c for c in out.chunks if c.seq_id == 1)
    assert chunk.start_pos == 0 and chunk.token_ids == b.token_ids() and chunk.needs_logits
    assert b.num_output_tokens == 4                      # generated tokens are kept, not re-sampled


def test_prefix_hit_skips_cached_blocks_but_computes_the_last_token():
    sched = make_scheduler(num_blocks=32, budget=64)
    a = make_seq(0, 12, 2)
    drive(sched, [a])
    b = Sequence(1, "r1", list(a.prompt_token_ids), SamplingParams(max_new_tokens=2), torch.Generator(), 256, BS)
    sched.add(b)
    out = sched.schedule()
    assert [(c.start_pos, c.num_tokens, c.needs_logits) for c in out.chunks] == [(8, 4, True)]


def test_max_running_is_capped_by_the_budget_so_decodes_always_fit():
    sched = make_scheduler(num_blocks=200, budget=4, max_num_seqs=100)
    passes = drive(sched, [make_seq(i, 2, 5) for i in range(10)])
    assert sched.max_running == 4
    assert all(p.num_tokens <= 4 for p in passes)


def test_separate_scheduling_never_mixes_decodes_and_prompts():
    rng = random.Random(1)
    sched = make_scheduler(num_blocks=80, budget=16, scheduling="separate")
    passes = drive(sched, [make_seq(i, rng.randint(1, 40), rng.randint(1, 10)) for i in range(12)])
    assert any(p.num_decode_chunks == 0 for p in passes) and any(p.num_decode_chunks for p in passes)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="reserve"):
        SchedulerConfig(16, 4, 64, reserve="sometimes").validate()
    with pytest.raises(ConfigError, match="token_budget"):
        SchedulerConfig(0, 4, 64).validate()
    with pytest.raises(ConfigError, match="scheduling"):
        SchedulerConfig(16, 4, 64, scheduling="both").validate()
