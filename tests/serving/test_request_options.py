"""n completions per prompt, top-k logprobs and priority: on the engine and over gRPC (real server, real model)."""

from __future__ import annotations

import math

import grpc
import pytest

from protos import tandem_pb2, tandem_pb2_grpc
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.rpc.server import GenerationServer, ServerConfig

PROMPT = "Once upon a time, there was a little"


@pytest.fixture(scope="module")
def stub(tinystories_path):
    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", token_budget=128))
    server = GenerationServer(engine, ServerConfig(host="127.0.0.1", port=0), model_name="tinystories")
    server.start()
    with grpc.insecure_channel(server.address) as channel:
        yield tandem_pb2_grpc.GenerationStub(channel)
    server.stop(grace=1.0)


def generate(stub, *prompts, **params) -> tandem_pb2.GenerateResponse:
    return stub.Generate(tandem_pb2.GenerateRequest(prompts=[tandem_pb2.Prompt(text=p) for p in prompts],
                                                    params=tandem_pb2.SamplingParams(**params)), timeout=120)


def test_n_completions_per_prompt_over_grpc(stub):
    out = generate(stub, PROMPT, "The cat", n=3, seed=11, max_new_tokens=10)
    assert [(c.index, c.sample_index) for c in out.completions] == [(i, j) for i in range(2) for j in range(3)]
    first = [c.text for c in out.completions[:3]]
    assert len(set(first)) > 1                                  # samples seeded 11, 12, 13
    assert [c.text for c in generate(stub, PROMPT, "The cat", n=3, seed=11, max_new_tokens=10).completions] == \
        [c.text for c in out.completions]
    streamed: dict = {}
    for delta in stub.GenerateStream(tandem_pb2.GenerateRequest(
            prompts=[tandem_pb2.Prompt(text=PROMPT)], params=tandem_pb2.SamplingParams(n=2, seed=11, max_new_tokens=10))):
        streamed[delta.sample_index] = streamed.get(delta.sample_index, "") + delta.text
    assert streamed == {0: first[0], 1: first[1]}


def test_top_logprobs_over_grpc(stub):
    c = generate(stub, PROMPT, temperature=0, top_logprobs=5, max_new_tokens=8).completions[0]
    assert len(c.top_logprobs) == len(c.token_ids) == 8
    for token, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        assert len(top.token_ids) == 5 and list(top.logprobs) == sorted(top.logprobs, reverse=True)
        assert top.token_ids[0] == token and top.logprobs[0] == pytest.approx(lp, abs=1e-5)   # greedy: the best
    assert not generate(stub, PROMPT, max_new_tokens=3).completions[0].top_logprobs        # off by default


def test_processed_logprobs_over_grpc(stub):
    """params.logprobs_mode "processed": logprobs and top_logprobs of the distribution sampled (top_k 4 here)."""
    processed = generate(stub, PROMPT, temperature=0.7, top_k=4, seed=5, top_logprobs=5, max_new_tokens=8,
                         logprobs_mode="processed").completions[0]
    raw = generate(stub, PROMPT, temperature=0.7, top_k=4, seed=5, top_logprobs=5, max_new_tokens=8).completions[0]
    assert processed.token_ids == raw.token_ids
    for token, lp, top, raw_top in zip(processed.token_ids, processed.logprobs, processed.top_logprobs, raw.top_logprobs):
        assert len(top.token_ids) == 4 and list(top.token_ids) == list(raw_top.token_ids)[:4]
        assert sum(math.exp(v) for v in top.logprobs) == pytest.approx(1.0, abs=1e-5)
        assert dict(zip(top.token_ids, top.logprobs))[token] == pytest.approx(lp, abs=1e-6)
    assert processed.logprobs != pytest.approx(list(raw.logprobs), abs=1e-3)


@pytest.mark.parametrize("params,field", [({"n": -1}, "params.n"), ({"n": 65}, "params.n"),
                                          ({"top_logprobs": 21}, "params.top_logprobs"),
                                          ({"top_logprobs": -1}, "params.top_logprobs"),
                                          ({"logprobs_mode": "processed_logprobs"}, "params.logprobs_mode"),
                                          ({"logprobs_mode": "RAW"}, "params.logprobs_mode")])
def test_bad_options_name_the_field(stub, params, field):
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, PROMPT, **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


def test_priority_orders_admission(tinystories_path):
    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", max_num_seqs=1))
    for rid, priority in [("a", 5), ("b", 5), ("urgent", 0), ("c", 5), ("later", 9), ("soon", 1)]:
        engine.add_request(rid, [1, 2, 3], SamplingParams(max_new_tokens=2, priority=priority))
    assert [s.request_id for s in engine.scheduler.waiting] == ["urgent", "soon", "a", "b", "c", "later"]
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["urgent", "soon", "a", "b", "c", "later"]    # one at a time, in priority order
