"""Paged KV cache bookkeeping: fixed-size blocks, a free list, reference counts and a prefix cache.

A block holds `block_size` tokens' keys/values. Free blocks sit in an LRU-ordered free list; a free
block may still hold a cached full block of some earlier sequence (found by its chained hash:
hash of the previous block's hash and this block's token ids) and is only overwritten (evicted)
when it reaches the front of the free list. A new sequence whose prompt starts with cached full
blocks takes them (ref count + 1) and skips computing them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

from serving.engine.sequence import Sequence


def chain_hash(prev_hash: int | None, token_ids: list[int]) -> int:
    return hash((prev_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: dict[int, tuple[int, ...]] = {}      # cached block id -> its token ids
        self.hash_to_block: dict[int, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evict first
        self.prefix_hit_tokens = 0                                # statistics

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ------------------------------------------------------------ prefix cache

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """Cached full blocks at the start of `token_ids` (block ids, hashes); the last token is never covered."""
        if not self.enable_prefix_caching:
            return [], []
        block_ids, hashes, prev = [], [], None
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = token_ids[i * bs:(i + 1) * bs]
            h = chain_hash(prev, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens.get(block) != tuple(tokens):
                break
            block_ids.append(block)
            hashes.append(h)
            prev = h
        return block_ids, hashes

    def num_free_taken_by(self, block_ids: list[int]) -> int:
        """How many of these cached blocks are on the free list (taking them shrinks it)."""
        return sum(1 for b in block_ids if self.ref_counts[b] == 0)

    def take_prefix(self, seq: Sequence, block_ids: list[int], hashes: list[int]) -> None:
        """Give a sequence with no blocks the matched cached blocks; they count as computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self.free_blocks[b]
            self.ref_counts[b] += 1
        seq.block_table = list(block_ids)
        seq.block_hashes = list(hashes)
        seq.num_computed_tokens = len(block_ids) * self.block_size
        self.prefix_hit_tokens += seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's newly computed full blocks in the prefix cache."""
        if not (self.enable_prefix_caching and seq.prefix_caching):
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = seq.token_slice(i * bs, (i + 1) * bs)
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                self.block_tokens[block] = tuple(tokens)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (after a weight update their keys/values are stale)."""
        self.hash_to_block.clear()
        self.block_tokens.clear()
        self.block_hash = [None] * self.num_blocks

    # ------------------------------------------------------------ allocation

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks the sequence needs so that its table covers `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to cover `num_tokens` tokens; False (nothing changed) if blocks run out."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            block, _ = self.free_blocks.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks reaching 0 go to the back of the free list (tail first)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_tokens.pop(block, None)
            self.block_hash[block] = None

    # ------------------------------------------------------------ invariants

    def assert_consistent(self, seqs: Iterable[Sequence]) -> None:
        """Every block is free xor referenced, ref counts equal table memberships, the cache map agrees."""
        counts = [0] * self.num_blocks
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq} repeats a block"
            assert seq.num_computed_tokens <= len(seq.block_table) * self.block_size, f"{seq} computed past its blocks"
            for b in seq.block_table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts disagree with the block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks)
        for b in range(self.num_blocks):
            assert (b in free) == (counts[b] == 0), f"block {b}: free={b in free} but refs={counts[b]}"
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h and b in self.block_tokens, f"cache entry of block {b} is inconsistent"
