"""The greedy pick kernel against torch.argmax and log_softmax, ties, masks and non-finite rows included."""

from __future__ import annotations

import pytest
import torch

from serving.engine.sampler import Sampler
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence
from serving.layers import cpu_extension, greedy_kernel

pytestmark = pytest.mark.skipif(cpu_extension.load() is None,
                                reason="tandem's CPU kernels could not be built here (no compiler?)")


@pytest.mark.parametrize("vocab", [2048, 50257, 5])
def test_pick_is_torchs_argmax_and_its_log_softmax(vocab):
    torch.manual_seed(0)
    logits = torch.randn(37, vocab) * 5
    logits[3, : vocab // 2] = float("-inf")                        # a masked half
    logits[4, 1] = logits[4, vocab - 1] = logits[4].max() + 1       # a tie: the first index wins, as torch's
    logits[5] = 0.0                                                 # all equal
    tokens, logprobs = greedy_kernel.greedy_pick(logits)
    want = torch.argmax(logits, dim=-1)
    assert torch.equal(tokens, want)
    assert tokens[4] == 1 and tokens[5] == 0
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, want[:, None])[:, 0],
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_are_left_to_torch(bad):
    logits = torch.randn(4, 2048)
    logits[2, 7] = bad
    got = greedy_kernel.greedy_pick(logits)
    if bad == float("-inf"):                                         # a masked token is an ordinary row
        assert got is not None and torch.equal(got[0], torch.argmax(logits, -1))
    else:
        assert got is None


def test_an_all_masked_row_is_left_to_torch():
    logits = torch.randn(3, 64)
    logits[1] = float("-inf")
    assert greedy_kernel.greedy_pick(logits) is None


def test_sampler_greedy_batch_equals_the_torch_path(monkeypatch):
    torch.manual_seed(1)
    logits = torch.randn(16, 2048) * 3
    seqs = [Sequence(i, f"r{i}", [1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=4), torch.Generator(), 512, 16)
            for i in range(16)]
    fast = Sampler(eos_token_ids=[2])(logits, seqs)
    monkeypatch.setattr(greedy_kernel, "ENABLED", False)
    slow = Sampler(eos_token_ids=[2])(logits, seqs)
    assert fast.token_ids == slow.token_ids
    assert fast.logprobs == pytest.approx(slow.logprobs, abs=2e-6)
