"""Paged attention over a ragged batch, and the per-pass metadata that all layers share.

The KV cache of one layer is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
Position p of a sequence lives at slot block_table[p // block_size] * block_size + p % block_size.

One forward pass carries single-token chunks (decodes) and multi-token chunks (prompt pieces), all
flattened into one batch of T tokens. The single-token chunks are sorted by context length and attended
in a few padded calls (at most MAX_DECODE_BUCKETS, of similar lengths): each bucket's blocks are gathered
to [b, max_blocks * block_size] keys with a key-padding mask. One call over all of them pads every
sequence to the longest context; with mixed lengths, bucketing measured 2.5-6x faster on CPU. Each
multi-token chunk gets one call with a causal mask shifted by its start position (plain `is_causal`
over its own keys when it starts at position 0).

On CPU, when the C++ kernel of serving/layers/paged_kernel.py is available, the single-token chunks are
instead attended in one call that reads keys and values where they lie in the cache (no gather, no
padding, no mask); the buckets above are the fallback (CUDA, no compiler, TANDEM_PAGED_KERNEL=0). The
same call takes the tokens of every multi-token chunk whose context's keys and values fit in one core's
L2 (KERNEL_PREFILL_BYTES), each as a row of its own that attends to the positions up to its own (the
chunk's keys are in the cache by then): the kernel re-reads that context once per token, which from L2
is cheaper than SDPA's CPU flash kernel (1.2-2.1x in bf16 at 64-912 positions, 1.2-1.8x in fp32 at
64-512, one thread; fp32 at 912 positions, 1.8 MiB, was 0.8x), and a pass of decodes and short prompt
pieces (the usual SplitFuse pass) is then one call in all. Longer contexts keep SDPA, which tiles the
queries and wins once the context leaves L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from serving.batch import ScheduledChunk
from serving.layers import paged_kernel


@dataclass
class PrefillChunk:
    """A multi-token chunk: its slice of the flat batch and what its attention call needs."""

    begin: int                   # first token of the chunk in the flat batch
    end: int
    start_pos: int               # tokens of the sequence already cached before this chunk
    block_ids: torch.Tensor      # blocks covering positions [0, start_pos + n) (unused when start_pos == 0)
    mask: torch.Tensor | None    # [n, start_pos + n] additive causal mask, None when start_pos == 0


KERNEL_PREFILL_BYTES = 1 << 20   # keys + values of a chunk's whole context, at most: the kernel takes it
MAX_DECODE_BUCKETS = 4
DECODES_PER_BUCKET = 8           # fewer decodes than this per bucket are not worth another call


@dataclass
class DecodeBucket:
    """Single-token chunks of similar context length, attended in one padded call."""

    rows: torch.Tensor | None     # [b] rows of the decode batch in this bucket; None = all rows, in order
    block_tables: torch.Tensor    # [b * max_blocks] flattened block tables (padded with block 0)
    mask: torch.Tensor            # [b, 1, 1, max_blocks * block_size] additive: 0 attend, -inf padding


@dataclass
class AttentionMetadata:
    """Index tensors for one forward pass, built once and used by every layer."""

    num_tokens: int
    slot_mapping: torch.Tensor          # [T] cache slot of each new token
    row_index: torch.Tensor             # [R] positions in the flat batch of the tokens attended row by row:
                                        # the single-token chunks (and on the kernel path short prompt chunks)
    rows_are_prefix: bool               # those are exactly tokens [0, R)
    decode_buckets: list[DecodeBucket]
    prefills: list[PrefillChunk]        # the chunks attended by SDPA, one call each
    row_tables: torch.Tensor | None = None      # [R, max_blocks] block tables for the in-place kernel
    row_lens: torch.Tensor | None = None        # [R] positions each row attends to (kernel path; no buckets)

    @staticmethod
    def build(chunks: list[ScheduledChunk], block_size: int, device: torch.device,
              dtype: torch.dtype = torch.float32, head_dim: int | None = None,
              num_kv_heads: int | None = None) -> AttentionMetadata:
        """num_kv_heads and head_dim size a chunk's context: without them, no prompt chunk takes the kernel."""
        kernel = paged_kernel.available(torch.device(device), dtype, head_dim)
        row_bytes = 2 * num_kv_heads * head_dim * dtype.itemsize if num_kv_heads and head_dim else None
        slots: list[int] = []
        rows: list[int] = []
        row_chunks: list[ScheduledChunk] = []
        prefills: list[PrefillChunk] = []
        offset = 0
        for chunk in chunks:
            n, start = chunk.num_tokens, chunk.start_pos
            table = chunk.block_table
            if n < 1 or len(table) * block_size < start + n:
                raise ValueError(f"chunk of seq {chunk.seq_id}: {n} tokens at {start} do not fit its "
                                 f"{len(table)} blocks of {block_size}")
            if n == 1:
                slots.append(table[start // block_size] * block_size + start % block_size)
            else:
                pos = np.arange(start, start + n)
                slots.extend((np.asarray(table, dtype=np.int64)[pos // block_size] * block_size
                              + pos % block_size).tolist())
            if n == 1 or (kernel and row_bytes and (start + n) * row_bytes <= KERNEL_PREFILL_BYTES):
                rows.extend(range(offset, offset + n))
                row_chunks.append(chunk)
            else:
                num_blocks = (start + n + block_size - 1) // block_size
                block_ids = torch.tensor(table[:num_blocks], dtype=torch.long, device=device)
                mask = None
                if start > 0:
                    allowed = torch.ones(n, start + n, dtype=torch.bool, device=device).tril(start)
                    mask = _additive(allowed, dtype)
                prefills.append(PrefillChunk(offset, offset + n, start, block_ids, mask))
            offset += n
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        tables = lens = None
        if row_chunks and kernel:
            buckets = []
            tables, lens = _row_tables(row_chunks, block_size)
        else:
            buckets = _decode_buckets(row_chunks, block_size, device, dtype)
        is_prefix = rows == list(range(len(rows)))
        return AttentionMetadata(offset, slot_mapping, torch.tensor(rows, dtype=torch.long, device=device),
                                 is_prefix, buckets, prefills, tables, lens)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as an additive bias, made once per pass instead of inside every layer."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _row_tables(chunks: list[ScheduledChunk], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables padded to the longest (the padding is never read) and the positions each row attends to:
    one row per token, token i of a chunk attending to its first start_pos + i + 1 positions."""
    lens = np.array([p for c in chunks for p in range(c.start_pos + 1, c.start_pos + c.num_tokens + 1)],
                    dtype=np.int64)
    width = (int(lens.max()) + block_size - 1) // block_size
    tables = np.zeros((len(lens), width), dtype=np.int64)
    row = 0
    for chunk in chunks:
        used = (chunk.start_pos + chunk.num_tokens + block_size - 1) // block_size
        tables[row:row + chunk.num_tokens, :used] = chunk.block_table[:used]
        row += chunk.num_tokens
    return torch.from_numpy(tables), torch.from_numpy(lens)


def _decode_buckets(chunks: list[ScheduledChunk], block_size: int, device: torch.device,
                    dtype: torch.dtype) -> list[DecodeBucket]:
    """Split the single-token chunks into buckets of similar context length (sorted, equal counts)."""
    if not chunks:
        return []
    context = np.array([c.start_pos + 1 for c in chunks], dtype=np.int64)
    count = max(1, min(MAX_DECODE_BUCKETS, len(chunks) // DECODES_PER_BUCKET))
    if count == 1:
        return [_decode_bucket(chunks, None, block_size, device, dtype)]
    order = np.argsort(context, kind="stable")
    return [_decode_bucket([chunks[i] for i in rows], torch.from_numpy(rows).to(device), block_size, device, dtype)
            for rows in np.array_split(order, count)]


def _decode_bucket(chunks: list[ScheduledChunk], rows: torch.Tensor | None, block_size: int, device: torch.device,
                   dtype: torch.dtype) -> DecodeBucket:
    """Padded block tables (the kernel's) and the key mask of one bucket."""
    tables, context = _row_tables(chunks, block_size)
    mask = torch.arange(tables.shape[1] * block_size)[None, :] < context[:, None]
    return DecodeBucket(rows, tables.reshape(-1).to(device), _additive(mask.to(device), dtype).view(len(chunks), 1, 1, -1))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float | None = None) -> torch.Tensor:
    """Write k/v [T, Hkv, D] to the cache, then attend q [T, H, D]; returns [T, H * D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    paged_kernel.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    num_rows = meta.row_index.numel()
    if num_rows == num_tokens:
        return _attend_rows(q, k_cache, v_cache, meta, scale).view(num_tokens, num_heads * head_dim)
    out = q.new_empty(num_tokens, num_heads * head_dim)
    if num_rows:
        q_rows = q[:num_rows] if meta.rows_are_prefix else q.index_select(0, meta.row_index)
        attended = _attend_rows(q_rows, k_cache, v_cache, meta, scale).view(num_rows, -1)
        if meta.rows_are_prefix:
            out[:num_rows] = attended
        else:
            out.index_copy_(0, meta.row_index, attended)
    groups = num_heads // num_kv_heads
    for chunk in meta.prefills:
        q_c = q[chunk.begin:chunk.end].transpose(0, 1)
        if chunk.mask is None:
            k_c, v_c = k[chunk.begin:chunk.end].transpose(0, 1), v[chunk.begin:chunk.end].transpose(0, 1)
        else:
            length = chunk.mask.shape[1]
            k_c = k_cache.index_select(0, chunk.block_ids).view(-1, num_kv_heads, head_dim)[:length].transpose(0, 1)
            v_c = v_cache.index_select(0, chunk.block_ids).view(-1, num_kv_heads, head_dim)[:length].transpose(0, 1)
        if groups > 1:  # explicit copies: `enable_gqa` would drop SDPA to its slow math path on CPU
            k_c, v_c = k_c.repeat_interleave(groups, 0), v_c.repeat_interleave(groups, 0)
        # 4-D inputs: SDPA's fused CPU kernel takes only those (3-D ones fall back to the math path)
        o = F.scaled_dot_product_attention(q_c[None], k_c[None], v_c[None], attn_mask=chunk.mask,
                                           is_causal=chunk.mask is None, scale=scale)
        out[chunk.begin:chunk.end] = o[0].transpose(0, 1).reshape(chunk.end - chunk.begin, -1)
    return out


def _attend_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float | None) -> torch.Tensor:
    """Attention for the rows, q [R, H, D] -> [R, H, D]: one kernel call, or one padded call per bucket (the
    query heads sharing a KV head laid out as that head's "query length": GQA without copies)."""
    if meta.row_tables is not None:
        return paged_kernel.paged_decode(q, k_cache, v_cache, meta.row_tables, meta.row_lens,
                                         q.shape[-1] ** -0.5 if scale is None else scale)
    if len(meta.decode_buckets) == 1:
        return _decode_bucket_attention(q, k_cache, v_cache, meta.decode_buckets[0], scale)
    out = torch.empty_like(q)
    for bucket in meta.decode_buckets:
        out.index_copy_(0, bucket.rows,
                        _decode_bucket_attention(q.index_select(0, bucket.rows), k_cache, v_cache, bucket, scale))
    return out


def _decode_bucket_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bucket: DecodeBucket,
                             scale: float | None) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    keys = k_cache.index_select(0, bucket.block_tables).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, bucket.block_tables).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    q = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bucket.mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim)
