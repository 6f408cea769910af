"""The in-place paged decode kernel against the PyTorch (gathered, bucketed SDPA) path it replaces."""

from __future__ import annotations

import random

import pytest
import torch

from serving.batch import ScheduledChunk
from serving.layers import attention, paged_kernel

pytestmark = pytest.mark.skipif(not paged_kernel.available(torch.device("cpu"), torch.float32),
                                reason="the paged decode kernel could not be built here (no compiler?)")


def _metadata(chunks, block_size, dtype, kernel: bool, head_dim=None, kv_heads=None):
    real = paged_kernel.available
    paged_kernel.available = real if kernel else (lambda *a, **k: False)
    try:
        return attention.AttentionMetadata.build(chunks, block_size, torch.device("cpu"), dtype, head_dim, kv_heads)
    finally:
        paged_kernel.available = real


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 64), (4, 4, 32), (8, 2, 48), (8, 4, 16), (2, 1, 128), (12, 4, 16)])
def test_kernel_matches_the_gathered_path_with_mixed_chunks(dtype, heads, kv_heads, head_dim, monkeypatch):
    # prompt chunks whose context's keys and values fit in 300 positions are the kernel's, row by row
    monkeypatch.setattr(attention, "KERNEL_PREFILL_BYTES", 300 * 2 * kv_heads * head_dim * dtype.itemsize)
    rng = random.Random(0)
    torch.manual_seed(0)
    block_size, num_blocks = 16, 128
    free = list(range(num_blocks))
    rng.shuffle(free)
    chunks, tokens = [], 0
    # two short prompt pieces, and one whose context (424 positions) SDPA keeps
    for seq, (n, start) in enumerate([(1, 0), (1, 15), (1, 16), (5, 40), (1, 200), (24, 400), (1, 77), (9, 0),
                                      (1, 31)]):
        need = (start + n + block_size - 1) // block_size
        table, free = free[:need], free[need:]
        chunks.append(ScheduledChunk(seq, [1] * n, start, table, True))
        tokens += n
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    q = torch.randn(tokens, heads, head_dim, dtype=dtype)
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype)
    v = torch.randn(tokens, kv_heads, head_dim, dtype=dtype)
    fast = _metadata(chunks, block_size, dtype, kernel=True, head_dim=head_dim, kv_heads=kv_heads)
    slow = _metadata(chunks, block_size, dtype, kernel=False, head_dim=head_dim, kv_heads=kv_heads)
    assert fast.row_tables is not None and not fast.decode_buckets and slow.row_tables is None
    assert [p.start_pos for p in fast.prefills] == [400] and len(slow.prefills) == 3
    assert fast.row_index.numel() == tokens - 24 and not fast.rows_are_prefix
    out_fast = attention.paged_attention(q, k, v, cache.clone(), fast)
    out_slow = attention.paged_attention(q, k, v, cache.clone(), slow)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_fast.float(), out_slow.float(), **tol)
    assert out_fast.dtype == dtype and out_fast.shape == (tokens, heads * head_dim)


def test_head_sizes_off_the_vector_width_keep_the_pytorch_path():
    assert paged_kernel.available(torch.device("cpu"), torch.float32, head_dim=16)
    for head_dim in (8, 24, 80 + 1, 144):
        assert not paged_kernel.available(torch.device("cpu"), torch.float32, head_dim=head_dim)
    assert not paged_kernel.available(torch.device("cpu"), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_puts_views_of_the_qkv_product_where_index_copy_does(dtype):
    torch.manual_seed(0)
    tokens, kv_heads, head_dim = 7, 4, 16
    qkv = torch.randn(tokens, (8 + 2 * kv_heads) * head_dim, dtype=dtype)
    k = qkv[:, 8 * head_dim:(8 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)   # strided rows
    v = qkv[:, (8 + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.tensor([3, 17, 0, 40, 41, 63, 5])
    fast = torch.randn(2, 4, 16, kv_heads, head_dim, dtype=dtype)
    slow = fast.clone()
    paged_kernel.write_kv(k, v, fast[0], fast[1], slots)
    for cache, new in ((slow[0], k), (slow[1], v)):
        cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, new)
    assert torch.equal(fast, slow)
    with pytest.raises(RuntimeError, match="out of the cache"):
        paged_kernel.write_kv(k, v, fast[0], fast[1], torch.tensor([3, 17, 0, 40, 41, 64, 5]))
    assert torch.equal(fast, slow)                    # a bad slot is refused before anything is written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_reads_q_as_a_view_of_the_qkv_product(dtype):
    torch.manual_seed(0)
    batch, heads, kv_heads, head_dim, block_size = 5, 8, 4, 64, 16
    cache = torch.randn(2, 12, block_size, kv_heads, head_dim, dtype=dtype)
    tables = torch.randperm(12)[:10].view(5, 2)
    lens = torch.tensor([1, 17, 32, 9, 25])
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(batch, heads, head_dim)             # row stride of the whole product
    assert not q.is_contiguous()
    got = paged_kernel.paged_decode(q, cache[0], cache[1], tables, lens, 0.125)
    want = paged_kernel.paged_decode(q.contiguous(), cache[0], cache[1], tables, lens, 0.125)
    assert torch.equal(got, want) and got.is_contiguous()
