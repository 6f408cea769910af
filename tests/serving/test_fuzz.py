"""Property-based fuzzing of the real server (issue 9): random GenerateRequest, RolloutRequest and WeightChunk
streams built from the proto, sent over real gRPC to a real TinyStories server.

For every example: the answer is OK or a status a client can act on, never INTERNAL or UNKNOWN (bad input is
the client's fault), and the server stays SERVING. At the end: a fixed greedy request returns the tokens it
returned before, and every KV block is free. The example counts are bounded (EXAMPLES per request kind) so
the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import tandem_pb2
from tests.serving.robust_server import AUTH, SERVING, greedy_tokens, health, settled_status, start, stub_for

EXAMPLES = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "60"))   # per request kind; CI runs the default
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("TANDEM_FUZZ_EXAMPLES"), database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

int32 = st.integers(-(2**31), 2**31 - 1)
small_or_wild = st.one_of(st.integers(-4, 12), int32)
floats = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-40, 1e-6, 0.7, 1.0]))
token_ids = st.lists(st.one_of(st.integers(0, 2047), int32), min_size=0, max_size=12)
prompts = st.lists(st.one_of(st.builds(lambda t: tandem_pb2.Prompt(text=t), st.text(max_size=40)),
                             st.builds(lambda ids: tandem_pb2.Prompt(token_ids=tandem_pb2.TokenIds(ids=ids)), token_ids),
                             st.just(tandem_pb2.Prompt())), min_size=0, max_size=10)


@st.composite
def sampling_params(draw) -> tandem_pb2.SamplingParams:
    p = tandem_pb2.SamplingParams(top_k=draw(small_or_wild), min_new_tokens=draw(st.integers(-2, 6)),
                                  ignore_eos=draw(st.booleans()),
                                  stop_token_ids=draw(st.lists(st.one_of(st.integers(0, 2047), int32), max_size=6)),
                                  stop=draw(st.lists(st.text(max_size=20), max_size=6)))
    for name, value in (("temperature", floats), ("top_p", floats), ("seed", st.integers(0, 2**64 - 1)),
                        ("max_new_tokens", st.integers(-3, 12))):
        if draw(st.booleans()):
            setattr(p, name, draw(value))
    return p


generate_requests = st.builds(lambda ps, params, rid: tandem_pb2.GenerateRequest(prompts=ps, params=params, request_id=rid),
                              prompts, sampling_params(), st.text(max_size=40))
rollout_requests = st.builds(lambda ps, params, n, rid: tandem_pb2.RolloutRequest(prompts=ps, params=params,
                                                                                  samples_per_prompt=n, rollout_id=rid),
                             prompts, sampling_params(), st.integers(-2, 5), st.text(max_size=40))

NAMES = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.0.self_attn.q_proj.lora_A.weight", "model.norm.weight", "nope"]
tensor_chunks = st.builds(
    lambda name, shape, dtype, block, data, scales, offset, last: tandem_pb2.TensorChunk(
        name=name, shape=shape, dtype=dtype, block_size=block, data=data, scales=scales, offset=offset, last=last),
    st.sampled_from(NAMES + [""]), st.lists(st.integers(-2, 2048), max_size=3),
    st.sampled_from(["float32", "bfloat16", "int8", "int4", "float64", ""]), st.one_of(st.integers(-4, 512), int32),
    st.binary(max_size=512), st.binary(max_size=64), st.integers(-4, 4096), st.booleans())
weight_chunks = st.one_of(
    st.builds(lambda v, o, lora, scale, n: tandem_pb2.WeightChunk(header=tandem_pb2.WeightHeader(
        version=v, origin=o, lora=lora, lora_scale=scale, num_tensors=n)),
        st.integers(-(2**63), 2**63 - 1), st.text(max_size=40), st.booleans(), floats, small_or_wild),
    st.builds(lambda c: tandem_pb2.WeightChunk(tensor=c), tensor_chunks),
    st.builds(lambda c: tandem_pb2.WeightChunk(commit=tandem_pb2.WeightCommit(checksum=c)), st.text(max_size=64)),
    st.just(tandem_pb2.WeightChunk()))
pushes = st.lists(weight_chunks, min_size=0, max_size=6)


@pytest.fixture(scope="module")
def fuzzed(tinystories_path):
    srv = start(tinystories_path)
    channel, stub = stub_for(srv)
    before = greedy_tokens(stub)
    yield srv, stub
    assert health(srv.address) == SERVING and srv.loop.alive
    assert greedy_tokens(stub) == before                        # no push got through, nothing leaked into it
    s = settled_status(stub)
    assert s.kv_blocks_free == s.kv_blocks_total and s.running == 0 and s.waiting == 0
    channel.close()
    srv.stop(grace=1.0)


def _call(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        assert err.code() not in NEVER, f"{err.code().name}: {err.details()}"
        return err.code()
    return grpc.StatusCode.OK


@SETTINGS
@given(msg=generate_requests, stream=st.booleans())
def test_fuzz_generate(fuzzed, msg, stream):
    srv, stub = fuzzed
    if stream:
        _call(lambda: list(stub.GenerateStream(msg, timeout=60)))
    else:
        _call(lambda: stub.Generate(msg, timeout=60))
    assert srv.loop.alive


@SETTINGS
@given(msg=rollout_requests)
def test_fuzz_rollout(fuzzed, msg):
    srv, stub = fuzzed
    _call(lambda: list(stub.StreamExperience(msg, timeout=60)))
    assert srv.loop.alive


@SETTINGS
@given(messages=pushes, authorized=st.booleans())
def test_fuzz_weight_push(fuzzed, messages, authorized):
    srv, stub = fuzzed
    code = _call(lambda: stub.PushWeights(iter(messages), timeout=60, metadata=AUTH if authorized else ()))
    assert code != grpc.StatusCode.OK, "a random push must never be applied"
    if not authorized:
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert srv.loop.alive
