"""Packed (oneDNN) linear layers: same results as F.linear, and they follow the weights when those change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serving.layers import linear as linear_mod
from serving.layers.linear import PackedLinear, packed_linears
from serving.models import load_model
from serving.models.random_init import save_random_checkpoint

pytestmark = pytest.mark.skipif(not linear_mod.ENABLED, reason="oneDNN (mkldnn) is not available in this torch build")

NO_BF16 = "this CPU's oneDNN has no bf16 linear (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"
BF16_SKIP = pytest.mark.skipif(torch.bfloat16 not in linear_mod.PACKED_DTYPES, reason=NO_BF16)
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=BF16_SKIP)]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


class Block(nn.Module):
    def __init__(self, dtype, bias: bool):
        super().__init__()
        self.a = nn.Linear(512, 512, bias=bias).to(dtype)
        self.b = nn.Linear(512, 256, bias=bias).to(dtype)
        self.ab = PackedLinear(self, ("a", "b"))
        self.only_a = PackedLinear(self, ("a",))


def _reference(x, block):
    return F.linear(x.float(), block.a.weight.float(), None if block.a.bias is None else block.a.bias.float()), \
        F.linear(x.float(), block.b.weight.float(), None if block.b.bias is None else block.b.bias.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_output_equals_f_linear(dtype, bias):
    torch.manual_seed(0)
    block = Block(dtype, bias).requires_grad_(False)
    x = torch.randn(37, 512, dtype=dtype)
    with torch.inference_mode():
        a, b = block.ab(x)
        only = block.only_a(x)
    assert block.ab.packed is not None and block.ab.packed.is_mkldnn      # the packed path ran
    ref_a, ref_b = _reference(x, block)
    assert a.shape == (37, 512) and b.shape == (37, 256) and a.dtype == dtype
    torch.testing.assert_close(a.float(), ref_a, **TOL[dtype])
    torch.testing.assert_close(b.float(), ref_b, **TOL[dtype])
    torch.testing.assert_close(only.float(), ref_a, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_result_follows_new_weights_after_an_in_place_write(dtype):
    torch.manual_seed(0)
    block = Block(dtype, bias=True).requires_grad_(False)
    x = torch.randn(8, 512, dtype=dtype)
    with torch.inference_mode():
        before, _ = block.ab(x)
        old_packed = block.ab.packed
        with torch.no_grad():
            block.a.weight.copy_(torch.randn_like(block.a.weight))
            block.b.bias.add_(1.0)
        assert block.ab.is_stale()
        a, b = block.ab(x)                        # no explicit repack: the version counters changed
    assert block.ab.packed is not old_packed
    ref_a, ref_b = _reference(x, block)
    torch.testing.assert_close(a.float(), ref_a, **TOL[dtype])
    torch.testing.assert_close(b.float(), ref_b, **TOL[dtype])
    assert not torch.allclose(a.float(), before.float(), **TOL[dtype])


def test_bf16_takes_the_plain_path_where_onednn_cannot_pack_it(monkeypatch):
    monkeypatch.setattr(linear_mod, "PACKED_DTYPES", (torch.float32,))
    torch.manual_seed(0)
    block = Block(torch.bfloat16, bias=True).requires_grad_(False)
    x = torch.randn(9, 512, dtype=torch.bfloat16)
    with torch.inference_mode():
        a, b = block.ab(x)
    assert block.ab.packed is None
    ref_a, ref_b = _reference(x, block)
    torch.testing.assert_close(a.float(), ref_a, **TOL[torch.bfloat16])
    torch.testing.assert_close(b.float(), ref_b, **TOL[torch.bfloat16])


def test_a_replaced_module_is_seen():
    torch.manual_seed(0)
    block = Block(torch.float32, bias=False).requires_grad_(False)
    x = torch.randn(4, 512)
    block.only_a(x)
    block.a = nn.Linear(512, 512, bias=False).requires_grad_(False)
    torch.testing.assert_close(block.only_a(x), F.linear(x, block.a.weight), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_repacks_after_write_weights(dtype, tmp_path):
    """The model-level hook: write_weights re-packs eagerly, and the logits follow the new matrix."""
    path = save_random_checkpoint(tmp_path / "llama", "llama", hidden_size=256, intermediate_size=1024,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  vocab_size=1024, max_position_embeddings=64, tie_word_embeddings=False)
    model, _ = load_model(path, dtype)
    packed = [p for p in packed_linears(model) if p.packed is not None]
    assert packed, "nothing was packed"
    assert model.after_weights_changed() == 0                      # all fresh after load
    hidden = torch.randn(5, 256, dtype=dtype)
    new_head = torch.randn(1024, 256)
    with torch.inference_mode():
        pairs = model.check_weights([("lm_head.weight", new_head)])
        model.write_weights(pairs)
        assert not model.head.is_stale()                           # re-packed by write_weights itself
        logits = model.compute_logits(hidden)
    torch.testing.assert_close(logits.float(), F.linear(hidden.float(), new_head.to(dtype).float()), **TOL[dtype])
