"""The paged KV block manager on its own: free list, reference counts, prefix cache, LRU eviction."""

from __future__ import annotations

import torch

from serving.engine.block_manager import BlockManager
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence

BS = 4


def make_seq(seq_id: int, prompt: list[int], max_new_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", prompt, SamplingParams(max_new_tokens=max_new_tokens),
                    torch.Generator().manual_seed(seq_id), max_model_len=1024, block_size=BS)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does after a forward pass over the whole prompt."""
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_allocate_free_and_running_out_changes_nothing():
    bm = BlockManager(num_blocks=5, block_size=BS, enable_prefix_caching=False)
    a, b = make_seq(0, list(range(10))), make_seq(1, list(range(7)))
    assert bm.allocate(a, 10) and len(a.block_table) == 3
    assert bm.allocate(a, 12) and len(a.block_table) == 3          # still covered
    assert bm.allocate(b, 7) and bm.num_free_blocks == 0
    bm.assert_consistent([a, b])
    table = list(b.block_table)
    assert not bm.allocate(b, 9)                                     # one more block: none left
    assert b.block_table == table and bm.num_free_blocks == 0
    bm.free(a)
    assert bm.num_free_blocks == 3 and a.block_table == [] and a.num_computed_tokens == 0
    bm.free(b)
    bm.assert_consistent([])
    assert bm.num_free_blocks == 5


def test_prefix_cache_reuses_full_blocks_and_keeps_the_last_token_uncomputed():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(100, 113))                    # 3 full blocks + 1 token
    a = make_seq(0, prompt)
    compute_all(bm, a)
    assert len(a.block_hashes) == 3
    b = make_seq(1, prompt[:12] + [7, 8])             # same 3 full blocks, different tail
    blocks, hashes = bm.match_prefix(b.token_ids())
    assert blocks == a.block_table[:3] and hashes == a.block_hashes
    bm.take_prefix(b, blocks, hashes)
    assert b.num_computed_tokens == 12
    assert all(bm.ref_counts[x] == 2 for x in blocks)  # shared with the running sequence
    bm.assert_consistent([a, b])
    # a prompt of exactly 3 full blocks may reuse only 2: its last token must be computed for logits
    assert len(bm.match_prefix(prompt[:12])[0]) == 2
    # a different first block breaks the chain even when later blocks are equal
    assert bm.match_prefix([0] + prompt[1:])[0] == []


def test_cached_blocks_survive_free_and_are_evicted_lru_only_at_ref_zero():
    bm = BlockManager(num_blocks=6, block_size=BS)
    prompt = list(range(9))                           # 2 full blocks + 1
    a = make_seq(0, prompt)
    compute_all(bm, a)
    cached = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 6
    assert bm.match_prefix(prompt)[0] == cached       # still cached while on the free list
    # taking free blocks uses never-cached ones first
    c = make_seq(2, list(range(50, 62)))
    assert bm.allocate(c, 12)
    assert not set(c.block_table) & set(cached)
    assert bm.match_prefix(prompt)[0] == cached
    # a sequence holding the cached blocks protects them from eviction
    b = make_seq(1, prompt)
    blocks, hashes = bm.match_prefix(prompt)
    bm.take_prefix(b, blocks, hashes)
    d = make_seq(3, list(range(70, 74)))
    assert bm.allocate(d, 4) and not bm.allocate(d, 8)   # only one unreferenced block left
    assert set(d.block_table).isdisjoint(cached)
    bm.assert_consistent([b, c, d])
    bm.free(b)
    bm.free(d)
    # unreferenced again: taking every free block now evicts them
    e = make_seq(4, list(range(200, 212)))
    assert bm.allocate(e, 12)
    assert bm.match_prefix(prompt)[0] == []
    bm.assert_consistent([c, e])


def test_reset_prefix_cache_forgets_everything():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    a = make_seq(0, prompt)
    compute_all(bm, a)
    bm.free(a)
    assert bm.match_prefix(prompt)[0]
    bm.reset_prefix_cache()
    assert bm.match_prefix(prompt) == ([], [])
    bm.assert_consistent([])


def test_prefix_caching_off_never_matches():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(0, list(range(9)))
    compute_all(bm, a)
    assert bm.match_prefix(list(range(9))) == ([], [])
    assert bm.hash_to_block == {}
