"""StreamExperience and the remote rollout source, against the real server on 127.0.0.1 (TinyStories-656K)."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from clients.weight_push import hf_tensors, push_weights
from learner.modeling import load_causal_lm
from learner.ppo.experience import SequenceBatch
from learner.ppo.trainer import sequence_logprobs
from learner.rollout.local import SamplingParams
from learner.rollout.remote import RemoteRolloutSource, RolloutError, TooStale, request_for
from protos import tandem_pb2, tandem_pb2_grpc
from serving.engine.config import EngineConfig
from serving.rpc.server import start_server

TOKEN = "experience-test-token"
PROMPTS = [[1, 300, 401, 17], [1, 52, 9], [1, 700, 33, 80, 91, 12, 5], [1, 1000]]


@pytest.fixture(scope="module")
def server(tinystories_path, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN)
    srv = start_server(EngineConfig(model=str(tinystories_path), device="cpu", token_budget=128, num_kv_blocks=256),
                       port=0, push_token_file=str(token_file))
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield tandem_pb2_grpc.GenerationStub(channel)


def status(stub) -> tandem_pb2.ServerStatus:
    return stub.GetStatus(tandem_pb2.StatusRequest(), timeout=10)


def wait_idle(stub, timeout: float = 10.0) -> tandem_pb2.ServerStatus:
    deadline = time.monotonic() + timeout
    while True:
        s = status(stub)
        if (s.running == 0 and s.waiting == 0 and s.kv_blocks_free == s.kv_blocks_total) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_every_sample_arrives_with_its_version_and_logprobs(stub):
    version, instance = status(stub).weight_version, status(stub).instance_id
    request = request_for(PROMPTS, SamplingParams(max_new_tokens=12, seed=7), samples_per_prompt=3, rollout_id="r1")
    experiences = list(stub.StreamExperience(request, timeout=60))
    assert sorted((e.prompt_index, e.sample_index) for e in experiences) == [(p, s) for p in range(4) for s in range(3)]
    for e in experiences:
        assert e.rollout_id == "r1" and e.weight_version == version and e.instance_id == instance
        assert list(e.prompt_token_ids) == PROMPTS[e.prompt_index]
        assert 1 <= len(e.response_token_ids) <= 12
        assert len(e.behaviour_logprobs) == len(e.response_token_ids)
        assert all(lp <= 0 for lp in e.behaviour_logprobs)
        assert e.finish_reason in (tandem_pb2.FINISH_REASON_STOP, tandem_pb2.FINISH_REASON_LENGTH)
    # every sample draws its own random stream, and a seeded rollout is reproducible
    by_key = {(e.prompt_index, e.sample_index): list(e.response_token_ids) for e in experiences}
    assert any(by_key[(p, 0)] != by_key[(p, 1)] for p in range(4))
    request.rollout_id = "r2"
    again = {(e.prompt_index, e.sample_index): list(e.response_token_ids)
             for e in stub.StreamExperience(request, timeout=60)}
    assert again == by_key
    twins = list(stub.StreamExperience(request_for([PROMPTS[1]] * 2, SamplingParams(max_new_tokens=12, seed=5)),
                                       timeout=60))
    assert twins[0].response_token_ids != twins[1].response_token_ids   # one seed, two independent draws


def test_behaviour_logprobs_equal_the_learners_logprobs(server, tinystories_path):
    """The condition for correct PPO ratios: the server's logprobs of its sampled tokens are the learner's own
    logprobs of the same tokens under the same weights (padded batch, learner code path)."""
    with RemoteRolloutSource(server.address, max_staleness=0) as source:
        rollouts = source.rollout(PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, seed=3), 2)
    batch = SequenceBatch.from_rollouts(rollouts, pad_id=0)
    model = load_causal_lm(tinystories_path, torch.float32).eval()
    with torch.no_grad():
        learner = sequence_logprobs(model, batch.input_ids, batch.attention_mask)
    mask = batch.action_mask.bool()
    assert mask.sum() == sum(len(r.response_ids) for r in rollouts) > 0
    diff = (learner[mask] - batch.behaviour_logprobs[mask]).abs().max().item()
    assert diff < 1e-4, f"max |server - learner| logprob difference {diff:.2e}"


@pytest.mark.parametrize("field, bad", [
    ("prompts", tandem_pb2.RolloutRequest()),
    ("samples_per_prompt", tandem_pb2.RolloutRequest(prompts=[tandem_pb2.Prompt(text="x")], samples_per_prompt=-2)),
    ("samples_per_prompt", tandem_pb2.RolloutRequest(prompts=[tandem_pb2.Prompt(text="x")] * 2,
                                                     samples_per_prompt=4000)),
    ("params.top_p", tandem_pb2.RolloutRequest(prompts=[tandem_pb2.Prompt(text="x")],
                                               params=tandem_pb2.SamplingParams(top_p=1.5))),
    ("prompts[1].token_ids.ids[0]", tandem_pb2.RolloutRequest(prompts=[
        tandem_pb2.Prompt(text="x"), tandem_pb2.Prompt(token_ids=tandem_pb2.TokenIds(ids=[99999]))])),
    ("params.logprobs_mode", tandem_pb2.RolloutRequest(prompts=[tandem_pb2.Prompt(text="x")],
                                                       params=tandem_pb2.SamplingParams(logprobs_mode="sampled"))),
    ("params.min_new_tokens", tandem_pb2.RolloutRequest(prompts=[tandem_pb2.Prompt(text="x")],
                                                        params=tandem_pb2.SamplingParams(max_new_tokens=4,
                                                                                         min_new_tokens=9))),
])
def test_bad_rollout_requests_are_invalid_argument_naming_the_field(stub, field, bad):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamExperience(bad, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert wait_idle(stub).running == 0            # nothing of it is left running


def test_a_rollout_id_already_in_flight_is_refused(stub):
    long = request_for(PROMPTS[:1], SamplingParams(max_new_tokens=300), rollout_id="dup")
    long.params.ignore_eos = True
    first = stub.StreamExperience(long, timeout=60)
    deadline = time.monotonic() + 20
    while status(stub).running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamExperience(request_for(PROMPTS[1:2], SamplingParams(max_new_tokens=2), rollout_id="dup"),
                                   timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("rollout_id")
    first.cancel()
    assert wait_idle(stub).running == 0


def test_cancelling_the_stream_frees_every_samples_kv_blocks(stub):
    request = request_for(PROMPTS, SamplingParams(max_new_tokens=400, seed=1), samples_per_prompt=4)
    request.params.ignore_eos = True
    call = stub.StreamExperience(request, timeout=60)
    deadline = time.monotonic() + 20
    while status(stub).running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    busy = status(stub)
    assert busy.running + busy.waiting > 0 and busy.kv_blocks_free < busy.kv_blocks_total
    call.cancel()
    idle = wait_idle(stub)
    assert (idle.running, idle.waiting) == (0, 0) and idle.kv_blocks_free == idle.kv_blocks_total
    # the server still answers
    assert len(list(stub.StreamExperience(request_for([[1, 5]], SamplingParams(max_new_tokens=2)), timeout=30))) == 1


def test_staleness_bound_prefetch_and_regeneration(server, stub, tinystories_path):
    """Prefetched samples made by v before a push are kept as stale at learner v+1; beyond the bound they are
    generated again with the weights in force; a bound the server cannot meet is a clear error."""
    params = SamplingParams(max_new_tokens=6, seed=11)
    base = status(stub).weight_version
    with RemoteRolloutSource(server.address, max_staleness=1) as source:
        assert source.learner_version == base
        fresh = source.generate(PROMPTS[:2], params)
        assert [r.weight_version for r in fresh] == [base, base] and source.last_stats["rollout_fresh"] == 2
        source.prefetch(PROMPTS[2:], params)
        report = push_weights(server.address, hf_tensors(tinystories_path), token=TOKEN, version=base + 1)
        assert report.version == base + 1
        source.learner_version = base + 1
        stale = source.generate(PROMPTS[2:], params)
        assert [r.weight_version for r in stale] == [base, base]
        assert source.last_stats["rollout_stale"] == 2 and source.last_stats["rollout_prefetched"] == 1.0
        source.learner_version = base + 2             # the sample made now (base + 1) is within the bound
        source.prefetch(PROMPTS[:1], params)
        source.learner_version = base + 3             # ... and the prefetched one (base + 1) is not
        with pytest.raises(RolloutError, match="max_staleness"):
            source.generate(PROMPTS[:1], params)      # regenerated at base + 1: still 2 behind
        source.learner_version = base + 2
        again = source.generate(PROMPTS[:1] + PROMPTS[3:], params)
        assert [r.weight_version for r in again] == [base + 1, base + 1]
        assert source.last_stats["rollout_stale"] == 2 and source.last_stats["rollout_prefetched"] == 0.0
        source.prefetch(PROMPTS[:1], params)          # a different batch than the one asked for is not used
        other = source.generate(PROMPTS[1:2], params)
        assert other[0].prompt_ids == PROMPTS[1] and source.last_stats["rollout_prefetched"] == 0.0


def test_samples_of_a_retired_server_process_are_never_used(server, stub):
    """After a restart the learner retires the old process's instance id: its samples are dropped and generated
    again even when their version is the learner's (here the one process is retired, so nothing can be kept)."""
    params = SamplingParams(max_new_tokens=4, seed=3)
    now = status(stub)
    with RemoteRolloutSource(server.address, max_staleness=1, learner_version=now.weight_version) as source:
        kept = source.generate(PROMPTS[:2], params)
        assert {r.meta["instance_id"] for r in kept} == {now.instance_id}
        source.retired.add(now.instance_id)
        with pytest.raises(TooStale):
            source.generate(PROMPTS[:2], params)
        assert source.totals["rollout_fresh"] == 2                   # the first batch only
    wait_idle(stub)


def test_group_rollouts_come_prompt_major_and_a_prefetch_must_match_the_group_size(server, stub):
    """GRPO/RLOO ask for several samples of each prompt in one StreamExperience call; the source returns them
    prompt-major with distinct samples, and a prefetched batch of another group size is not reused."""
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)
    with RemoteRolloutSource(server.address, max_staleness=1, learner_version=status(stub).weight_version) as source:
        group = source.generate(PROMPTS[:2], params, 3)
        assert [r.prompt_ids for r in group] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
        assert [r.meta["sample_index"] for r in group] == [0, 1, 2, 0, 1, 2]
        assert len({tuple(r.response_ids) for r in group[:3]}) > 1      # three samples, not one repeated
        assert source.last_stats["rollout_fresh"] == 6
        source.prefetch(PROMPTS[2:], params, 2)
        single = source.generate(PROMPTS[2:], params)                  # asked with 1 sample: generated afresh
        assert len(single) == 2 and source.last_stats["rollout_prefetched"] == 0.0
        source.prefetch(PROMPTS[2:], params, 2)
        paired = source.generate(PROMPTS[2:], params, 2)
        assert len(paired) == 4 and source.last_stats["rollout_prefetched"] == 1.0
    wait_idle(stub)


def test_the_learners_sampling_options_reach_both_rollout_sources(server, tinystories_path):
    """ignore_eos and min_new_tokens as the server knows them: a rollout can be made exactly like
    DeepSpeed-Chat's fixed-length ones, from the server or from the learner's own HF generate, and
    greedy (temperature 0) evaluation rollouts agree between the two."""
    from learner.modeling import load_tokenizer
    from learner.rollout.local import LocalRolloutSource

    free = SamplingParams(max_new_tokens=N_LONG, temperature=1.0, seed=4)
    fixed = SamplingParams(max_new_tokens=N_LONG, temperature=1.0, seed=4, ignore_eos=True)
    at_least = SamplingParams(max_new_tokens=N_LONG, temperature=1.0, seed=4, min_new_tokens=N_LONG - 20)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    local = LocalRolloutSource(load_causal_lm(tinystories_path, torch.float32).eval(), load_tokenizer(tinystories_path))
    with RemoteRolloutSource(server.address, max_staleness=0) as remote:
        make = {"server": lambda p: remote.rollout(PROMPTS, p, 2), "learner": lambda p: local.generate(PROMPTS * 2, p)}
        for name, rollouts_for in make.items():
            assert any(len(r.response_ids) < N_LONG - 20 for r in rollouts_for(free)), name   # EOS comes early
            assert all(len(r.response_ids) == N_LONG for r in rollouts_for(fixed)), name
            assert all(len(r.response_ids) >= N_LONG - 20 for r in rollouts_for(at_least)), name
        served = [r.response_ids for r in remote.rollout(PROMPTS, greedy, 1)]
    assert served == [r.response_ids for r in local.generate(PROMPTS, greedy)]


N_LONG = 300
