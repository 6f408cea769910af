"""Wire codecs: exact round trips for fp32, bounded error for blockwise INT8/INT4, strict assembly."""

import math

import pytest
import torch

from protos import tandem_pb2
from protos.codec import CodecError, TensorAssembler, checksum, encode_tensor, roundtrip
from protos.quantize import dequantize_blockwise, quantize_blockwise


def _assemble(chunks, shape, dtype):
    a = TensorAssembler("w", tuple(shape), dtype)
    done = False
    for c in chunks:
        done = a.add(c)
    assert done
    return a.tensor()


@pytest.mark.parametrize("shape", [(7,), (33, 65), (4, 3, 129)])
def test_float32_roundtrip_is_exact_across_chunks(shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    chunks = list(encode_tensor("w", t, "float32", chunk_bytes=64))
    assert len(chunks) == math.ceil(t.numel() * 4 / 64)
    assert torch.equal(_assemble(chunks, shape, "float32"), t)


def test_bfloat16_roundtrip_equals_a_bf16_cast():
    t = torch.randn(100, 37)
    out = _assemble(encode_tensor("w", t, "bfloat16", chunk_bytes=128), t.shape, "bfloat16")
    assert torch.equal(out, t.to(torch.bfloat16).to(torch.float32))


@pytest.mark.parametrize("encoding,bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("numel", [1, 63, 64, 1001])
def test_blockwise_error_is_bounded_by_half_a_step_per_block(encoding, bits, numel):
    block = 32
    t = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * torch.linspace(0.01, 10, numel)
    out = _assemble(encode_tensor("w", t, encoding, block_size=block, chunk_bytes=40), (numel,), encoding)
    qmax = 127 if bits == 8 else 7
    for start in range(0, numel, block):
        blk = t[start:start + block]
        step = blk.abs().max() / qmax
        assert (out[start:start + block] - blk).abs().max() <= step / 2 + 1e-6


def test_wire_sizes_follow_qwz():
    t = torch.randn(4096)
    size = {e: sum(len(c.data) + len(c.scales) for c in encode_tensor("w", t, e, block_size=256))
            for e in ("float32", "bfloat16", "int8", "int4")}
    assert size["bfloat16"] == size["float32"] // 2
    assert size["int8"] == 4096 + 4 * 16          # one byte each plus a float32 scale per block
    assert size["int4"] == 2048 + 4 * 16


def test_zero_block_is_exact():
    data, scales = quantize_blockwise(torch.zeros(10), 4, 4)
    assert torch.equal(dequantize_blockwise(data, scales, 4, 4, 10), torch.zeros(10))


def test_assembler_rejects_gaps_overruns_and_missing_tails():
    t = torch.randn(100)
    chunks = list(encode_tensor("w", t, "float32", chunk_bytes=80))
    a = TensorAssembler("w", (100,), "float32")
    with pytest.raises(CodecError, match="offset"):
        a.add(chunks[1])
    a = TensorAssembler("w", (50,), "float32")
    with pytest.raises(CodecError):
        for c in chunks:
            a.add(c)
    a = TensorAssembler("w", (100,), "float32")
    a.add(chunks[0])
    with pytest.raises(CodecError, match="incomplete"):
        a.tensor()
    bad = tandem_pb2.TensorChunk(name="w", shape=[4], dtype="float32", data=b"\0" * 12, last=True)
    with pytest.raises(CodecError, match="bytes|missing"):
        TensorAssembler("w", (4,), "float32").add(bad)


def test_checksum_sees_a_single_changed_value_and_the_name():
    t = torch.randn(10, 10)
    base = checksum([("a", t)])
    t2 = t.clone()
    t2[3, 3] += 1e-3
    assert checksum([("a", t2)]) != base
    assert checksum([("b", t)]) != base
    assert checksum([("a", roundtrip(t, "float32"))]) == base
