"""Dynamic SplitFuse scheduling: a fixed token budget per forward pass, decode tokens first.

Every pass, running sequences that are decoding contribute their one token first; then prompt
chunks fill the rest of the budget: sequences already mid-prompt first, then newly admitted ones
in arrival order (FCFS, no skipping, so nothing starves). Long prompts are split across passes,
short ones packed together.

Admission control (`reserve="worst_case"`, the default): a sequence is admitted only when its
worst-case KV need (blocks for min(prompt + max_new_tokens, max_model_len) tokens, minus
prefix-cache hits) fits in free blocks not already promised to admitted sequences. Running
sequences then can never run out of blocks and no load can deadlock. With `reserve="none"` the
cache is overcommitted (admit when the first chunk fits) and, when blocks run out, the most
recently admitted sequence is preempted by recompute: its blocks are freed and it goes back to
the front of the queue, its generated tokens folded into the prompt it recomputes.

`scheduling="separate"` is the ablation baseline (vLLM v0 / HF style): a pass carries either
prompt chunks only (preferred while any are pending) or decode tokens only, never both.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.errors import ConfigError
from serving.batch import ScheduledChunk
from serving.engine.block_manager import BlockManager
from serving.engine.config import SCHEDULING_MODES
from serving.engine.sequence import Sequence, SequenceStatus

RESERVE_MODES = ("worst_case", "none")


@dataclass
class SchedulerConfig:
    token_budget: int
    max_num_seqs: int
    max_model_len: int
    reserve: str = "worst_case"      # "worst_case": admission control; "none": overcommit + preemption
    scheduling: str = "splitfuse"    # "splitfuse": decodes + prompt chunks fused; "separate": one kind per pass

    def validate(self) -> SchedulerConfig:
        for name in ("token_budget", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.reserve not in RESERVE_MODES:
            raise ConfigError("reserve", f"must be one of {', '.join(RESERVE_MODES)}, got {self.reserve!r}")
        if self.scheduling not in SCHEDULING_MODES:
            raise ConfigError("scheduling", f"must be one of {', '.join(SCHEDULING_MODES)}, got {self.scheduling!r}")
        return self


@dataclass
class SchedulerOutput:
    """One forward pass: chunks[i] belongs to seqs[i]; the first `num_decode_chunks` are decodes."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    num_decode_chunks: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config.validate()
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # every running sequence must get its decode token in every pass
        self.max_running = min(config.max_num_seqs, config.token_budget)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue by priority (lower first), FCFS among equals: behind every waiting one of equal or lower value."""
        seq.status = SequenceStatus.WAITING
        priority = seq.params.priority
        if not self.waiting or self.waiting[-1].params.priority <= priority:
            self.waiting.append(seq)
            return
        for i, other in enumerate(self.waiting):
            if other.params.priority > priority:
                self.waiting.insert(i, seq)
                return

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted): its KV blocks are freed at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: free the blocks, requeue at the front; its tokens are recomputed."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def reserved_blocks(self) -> int:
        """Blocks admitted sequences may still allocate in the worst case."""
        return sum(max(0, s.max_blocks - len(s.block_table)) for s in self.running)

    # ------------------------------------------------------------ one pass

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: set[int] = set()
        budget = self.config.token_budget
        if self.config.scheduling == "separate":          # ablation: prefill-only or decode-only passes
            self._schedule_prompts(out, scheduled, budget)
            if not out.chunks:
                self._schedule_decodes(out, scheduled)
            return out
        budget -= self._schedule_decodes(out, scheduled)
        self._schedule_prompts(out, scheduled, budget)
        return out

    def _schedule_decodes(self, out: SchedulerOutput, scheduled: set[int]) -> int:
        """Every decoding sequence's one token, in admission order; returns the tokens used."""
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding:
                continue
            if not self._allocate(seq, seq.num_tokens, scheduled, out):
                self.preempt(seq)                             # nothing else left to take blocks from
                out.preempted.append(seq)
                continue
            self._add_chunk(out, seq, 1, scheduled)
        out.num_decode_chunks = len(out.chunks)
        return out.num_decode_chunks

    def _schedule_prompts(self, out: SchedulerOutput, scheduled: set[int], budget: int) -> None:
        """Prompt chunks: sequences already mid-prompt first, then new admissions (FCFS)."""
        for seq in list(self.running):
            if budget == 0:
                return
            if seq.status is not SequenceStatus.RUNNING or seq.seq_id in scheduled or seq.is_decoding:
                continue
            n = self._fit_chunk(seq, min(seq.num_uncomputed_tokens, budget), scheduled, out)
            if n:
                self._add_chunk(out, seq, n, scheduled)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if not n:
                break
            self._add_chunk(out, seq, n, scheduled)
            budget -= n

    def _add_chunk(self, out: SchedulerOutput, seq: Sequence, n: int, scheduled: set[int]) -> None:
        start = seq.num_computed_tokens
        end = start + n
        out.chunks.append(ScheduledChunk(seq_id=seq.seq_id, token_ids=seq.token_slice(start, end), start_pos=start,
                                         block_table=seq.block_table, needs_logits=end == seq.num_tokens))
        out.seqs.append(seq)
        scheduled.add(seq.seq_id)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Admit the head of the queue if its KV need fits; return its first chunk's size (0: not admitted)."""
        bm = self.block_manager
        hit_blocks, hashes = bm.match_prefix(seq.token_ids())
        hit_tokens = len(hit_blocks) * bm.block_size
        n = min(seq.num_tokens - hit_tokens, budget)
        available = bm.num_free_blocks - bm.num_free_taken_by(hit_blocks)
        if self.config.reserve == "worst_case":
            fits = seq.max_blocks - len(hit_blocks) <= available - self.reserved_blocks()
        else:
            fits = bm.blocks_for(hit_tokens + n) - len(hit_blocks) <= available
        if not fits:
            return 0
        self.waiting.popleft()
        bm.take_prefix(seq, hit_blocks, hashes)
        assert bm.allocate(seq, hit_tokens + n), "admission check and allocation disagree"
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return n

    def _allocate(self, seq: Sequence, num_tokens: int, scheduled: set[int], out: SchedulerOutput) -> bool:
        """Cover `num_tokens` tokens; in overcommit mode preempt the newest unscheduled sequences to do so."""
        while not self.block_manager.allocate(seq, num_tokens):
            if self.config.reserve == "worst_case":
                raise RuntimeError(f"KV blocks ran out for admitted {seq}: admission control is broken")
            victim = self._pick_victim(seq, scheduled)
            if victim is None:
                return False
            self.preempt(victim)
            out.preempted.append(victim)
        return True

    def _fit_chunk(self, seq: Sequence, n: int, scheduled: set[int], out: SchedulerOutput) -> int:
        """Tokens of a prompt chunk that get blocks (preempting only when not even one token would)."""
        bm = self.block_manager
        start = seq.num_computed_tokens
        if bm.allocate(seq, start + n):
            return n
        room = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size - start
        if room <= 0:
            return 1 if self._allocate(seq, start + 1, scheduled, out) else 0
        assert bm.allocate(seq, start + min(n, room))
        return min(n, room)

    def _pick_victim(self, seq: Sequence, scheduled: set[int]) -> Sequence | None:
        for victim in reversed(self.running):
            if victim is not seq and victim.seq_id not in scheduled:
                return victim
        return None
