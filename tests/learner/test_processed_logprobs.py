"""logprobs_mode "processed" on the learner's side: its processing equals the server's sampler, and the server's
behaviour logprobs returned over gRPC (StreamExperience, a real server on TinyStories-656K) equal the learner's
own logprobs of the same tokens under the same processing, at temperature 0.7 with top-k (and with top-p)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.errors import ConfigError
from learner.cli_args import parse_config
from learner.config import PPOConfig
from learner.modeling import load_causal_lm, load_tokenizer
from learner.ppo.experience import SequenceBatch
from learner.ppo.processing import OUTSIDE_LOGPROB, LogitProcessing, processing_for
from learner.ppo.trainer import sequence_logprobs
from learner.rollout.local import LocalRolloutSource, SamplingParams
from learner.rollout.remote import RemoteRolloutSource
from serving.engine.config import EngineConfig
from serving.engine.sampler import process_logits
from serving.engine.sampling_params import SamplingParams as ServingParams
from serving.rpc.server import start_server

PROMPTS = [[1, 300, 401, 17], [1, 52, 9], [1, 700, 33, 80, 91, 12, 5], [1, 1000]]
TOL = 1e-4
SETTINGS = [dict(temperature=0.7, top_k=5), dict(temperature=0.7, top_p=0.8), dict(temperature=1.3, top_k=20, top_p=0.9)]
IDS = ["t0.7,top_k=5", "t0.7,top_p=0.8", "t1.3,top_k=20,top_p=0.9"]


@pytest.mark.parametrize("knobs", SETTINGS, ids=IDS)
def test_the_learners_processing_is_the_samplers(knobs):
    logits = torch.randn(6, 9, 300, generator=torch.Generator().manual_seed(0)) * 3
    learner = LogitProcessing(**knobs).logits(logits)
    for b in range(6):
        for t in range(9):
            served = process_logits(logits[b, t], ServingParams(**knobs))
            assert torch.equal(torch.isinf(learner[b, t]), torch.isinf(served))     # the same kept set
            torch.testing.assert_close(learner[b, t], served, atol=1e-6, rtol=0)
    assert LogitProcessing(temperature=0, top_k=3).logits(logits).isfinite().all()  # greedy: raw logits


def test_outside_the_kept_set_is_finite_and_carries_no_gradient():
    logits = (torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    processing = LogitProcessing(temperature=0.7, top_k=3)
    labels = logits.argsort(-1, descending=True)[..., 10]                # never among the 3 kept
    out = processing.logprobs(logits, labels)
    assert (out == OUTSIDE_LOGPROB).all()
    (out * torch.zeros_like(out)).sum().backward()                           # as a 0 mask does: no NaN
    assert logits.grad.isfinite().all() and (logits.grad == 0).all()
    best = logits.argmax(-1)
    kept = processing.logprobs(logits, best)
    kept.sum().backward()
    assert logits.grad.isfinite().all() and logits.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def server(tinystories_path):
    srv = start_server(EngineConfig(model=str(tinystories_path), device="cpu", token_budget=128, num_kv_blocks=256),
                       port=0)
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def model(tinystories_path):
    return load_causal_lm(tinystories_path, torch.float32).eval()


def learner_logprobs(model, rollouts, params: SamplingParams):
    batch = SequenceBatch.from_rollouts(rollouts, pad_id=0)
    with torch.no_grad():
        raw, processed = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_width,
                                           processing_for(dataclasses.replace(params, logprobs_mode="processed")))
    mask = batch.action_mask.bool()
    assert mask.sum() == sum(len(r.response_ids) for r in rollouts) > 20
    return raw[mask], processed[mask], batch.behaviour_logprobs[mask]


@pytest.mark.parametrize("knobs", SETTINGS, ids=IDS)
def test_server_processed_logprobs_equal_the_learners_over_grpc(server, model, knobs):
    params = SamplingParams(max_new_tokens=24, seed=3, logprobs_mode="processed", **knobs)
    with RemoteRolloutSource(server.address, max_staleness=0) as source:
        rollouts = source.rollout(PROMPTS, params, 2)
        raw_rollouts = source.rollout(PROMPTS, dataclasses.replace(params, logprobs_mode="raw"), 2)
    raw, processed, behaviour = learner_logprobs(model, rollouts, params)
    diff = (processed - behaviour).abs().max().item()
    assert diff < TOL, f"max |server - learner| processed logprob difference {diff:.2e}"
    assert (behaviour > OUTSIDE_LOGPROB).all()                               # every sampled token was kept
    assert (processed - raw).abs().max().item() > 0.05                       # and it is not the raw distribution
    # the raw mode still gives the raw ones (the same seeded draws)
    assert [r.response_ids for r in raw_rollouts] == [r.response_ids for r in rollouts]
    raw_again, _, raw_behaviour = learner_logprobs(model, raw_rollouts, params)
    assert (raw_again - raw_behaviour).abs().max().item() < TOL


def test_local_rollouts_carry_the_logprobs_the_learner_computes(tinystories_path, model):
    local = LocalRolloutSource(model, load_tokenizer(tinystories_path))
    params = SamplingParams(max_new_tokens=24, seed=2, temperature=0.7, top_k=5, logprobs_mode="processed")
    rollouts = local.generate(PROMPTS * 2, params)
    _, processed, behaviour = learner_logprobs(model, rollouts, params)
    assert (processed - behaviour).abs().max().item() < TOL
    assert (behaviour > OUTSIDE_LOGPROB).all()


def test_config_fields_are_validated_and_reach_the_rollout_params():
    config = parse_config("ppo", ["--logprobs_mode", "processed", "--top_k", "5", "--temperature", "0.7"])
    assert (config.logprobs_mode, config.top_k) == ("processed", 5)
    assert processing_for(config) == LogitProcessing(temperature=0.7, top_k=5, top_p=1.0)
    assert processing_for(PPOConfig()) is None
    for bad, field in [(dict(logprobs_mode="sampled"), "logprobs_mode"), (dict(top_k=-1), "top_k"),
                       (dict(logprobs_mode="processed", min_new_tokens=4), "logprobs_mode")]:
        with pytest.raises(ConfigError) as err:
            PPOConfig(**bad).validate()
        assert err.value.field == field
    PPOConfig(logprobs_mode="processed", min_new_tokens=4, ignore_eos=True).validate()   # nothing is masked then
