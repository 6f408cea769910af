"""Issue 9: no client, pusher or slow reader can take the server down. Real server, real model, real gRPC."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from clients.weight_push import hf_tensors, weight_messages
from protos import tandem_pb2
from serving.engine.loop import RequestStream
from serving.engine.sampling_params import SamplingParams
from serving.weights.stage import MAX_QUANT_BLOCK, MAX_VERSION, StagedUpdate
from tests.serving.robust_server import (
    AUTH,
    GREEDY_PROMPT,
    SERVING,
    greedy_tokens,
    health,
    request,
    settled_status,
    start,
    stub_for,
)

FINISH_ABORT = tandem_pb2.FINISH_REASON_ABORT


@pytest.fixture(scope="module")
def server(tinystories_path):
    srv = start(tinystories_path)
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def stub(server):
    channel, stub = stub_for(server)
    yield stub
    channel.close()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# ---------------------------------------------------------------- 1, 2: isolation and sampling numerics

def test_tiny_temperatures_sample_greedily_and_the_server_survives(server, stub):
    greedy = greedy_tokens(stub)
    for t in (1e-40, 1e-30, 1e-6):
        reply = stub.Generate(request(GREEDY_PROMPT, temperature=t, max_new_tokens=24, ignore_eos=True), timeout=60)
        assert list(reply.completions[0].token_ids) == greedy, t
    streamed = [t for d in stub.GenerateStream(request(GREEDY_PROMPT, temperature=1e-40, max_new_tokens=24,
                                                       ignore_eos=True), timeout=60) for t in d.token_ids]
    assert streamed == greedy
    assert health(server.address) == SERVING and server.loop.alive


def test_an_empty_allowed_set_is_refused_at_admission(server, stub):
    every_token = list(range(2048))     # with min_new_tokens, every id is masked: nothing could be sampled
    err = _code(lambda: stub.Generate(request("Once", temperature=1.0, min_new_tokens=2, stop_token_ids=every_token),
                                      timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop_token_ids" in err.details()
    assert "nothing can be sampled" in err.details()
    # the same ids without min_new_tokens are fine: the first token simply stops
    reply = stub.Generate(request("Once", temperature=1.0, stop_token_ids=every_token), timeout=30)
    assert reply.completions[0].finish_reason == tandem_pb2.FINISH_REASON_STOP
    assert health(server.address) == SERVING


def test_non_finite_logits_end_that_request_only(tinystories_path):
    """A damaged rotary table (NaN from position 200 on) poisons exactly the sequences that reach it."""
    srv = start(tinystories_path)
    try:
        channel, stub = stub_for(srv)
        healthy = greedy_tokens(stub, n=40)
        srv.loop.call(lambda e: e.runner.model.model.rotary_emb.cos[200:].fill_(float("nan")), timeout=30)
        long_prompt = [1] + [300 + i % 50 for i in range(190)]
        errors, shorts = [], []

        def long_call():
            try:
                stub.Generate(request(long_prompt, temperature=0.8, max_new_tokens=40, ignore_eos=True), timeout=60)
            except grpc.RpcError as err:
                errors.append(err)

        threads = [threading.Thread(target=long_call) for _ in range(2)]
        for th in threads:
            th.start()
        for _ in range(3):
            shorts.append(greedy_tokens(stub, n=40))
        for th in threads:
            th.join(60)
        assert len(errors) == 2
        assert all(e.code() == grpc.StatusCode.ABORTED and "non-finite logits" in e.details() for e in errors)
        assert all(tokens == healthy for tokens in shorts)           # the others never noticed
        assert health(srv.address) == SERVING and srv.loop.alive
        s = settled_status(stub)
        assert s.kv_blocks_free == s.kv_blocks_total
        channel.close()
    finally:
        srv.stop(grace=1.0)


# ---------------------------------------------------------------- 3: limits

@pytest.mark.parametrize("make, field, limit", [
    (lambda: request(*["Once"] * 9), "prompts", "max_prompts"),
    (lambda: request("Once", request_id="r" * 33), "request_id", "max_id_chars"),
    (lambda: request("Once", stop=["a", "b", "c", "d", "e"]), "params.stop", "max_stop_strings"),
    (lambda: request("Once", stop=["x" * 17]), "params.stop[0]", "max_stop_chars"),
    (lambda: request("Once", stop_token_ids=[5] * 2049), "params.stop_token_ids", "max_stop_token_ids"),
    (lambda: request(*["Once upon a time"] * 8, max_new_tokens=500), "params.max_new_tokens", "max_request_tokens"),
])
def test_each_request_limit_is_refused_naming_it(stub, make, field, limit):
    err = _code(lambda: stub.Generate(make(), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(field) and limit in err.details()


def test_rollout_limits_and_message_size(stub):
    too_many = tandem_pb2.RolloutRequest(prompts=[tandem_pb2.Prompt(text="Once")] * 4, samples_per_prompt=5)
    err = _code(lambda: list(stub.StreamExperience(too_many, timeout=30)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_samples" in err.details()
    long_id = tandem_pb2.RolloutRequest(prompts=[tandem_pb2.Prompt(text="Once")], rollout_id="x" * 40)
    err = _code(lambda: list(stub.StreamExperience(long_id, timeout=30)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("rollout_id")
    huge = request("Once", request_id="", stop=[])
    huge.prompts[0].text = "x" * (3 << 20)                     # over max_message_bytes (2 MiB)
    err = _code(lambda: stub.Generate(huge, timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_full_server_answers_resource_exhausted_at_once(server, stub):
    busy = stub.GenerateStream(request(*[GREEDY_PROMPT] * 8, temperature=0, max_new_tokens=400, ignore_eos=True),
                               timeout=120)
    next(busy)                                                      # 8 of 16 slots held
    second = stub.GenerateStream(request(*[GREEDY_PROMPT] * 8, temperature=0, max_new_tokens=400, ignore_eos=True),
                                 timeout=120)
    next(second)                                                    # 16 of 16
    err = _code(lambda: stub.Generate(request("Once", max_new_tokens=4), timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending" in err.details()
    busy.cancel()
    second.cancel()
    settled_status(stub)
    assert len(stub.Generate(request("Once", max_new_tokens=4), timeout=30).completions) == 1   # slots came back


def test_a_slow_reader_holds_one_unread_output_per_prompt(server, stub):
    """A stream nobody reads while its requests run to the end: one merged output per prompt, and reading it
    late gives every token, as a fast reader would have had them."""
    want = greedy_tokens(stub, n=200)
    stream = RequestStream(["slow-0", "slow-1"])
    server.loop.submit(stream, [GREEDY_PROMPT, GREEDY_PROMPT],
                       SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True))
    other = greedy_tokens(stub, n=200)                              # another client is not stalled meanwhile
    assert other == want
    settled_status(stub)
    assert stream.unread <= 2
    got = {0: [], 1: []}
    for index, out in stream:
        got[index] += out.new_token_ids
    assert got[0] == want and got[1] == want


# ---------------------------------------------------------------- 4: weight pushes

def _push(stub, messages, metadata=AUTH):
    return stub.PushWeights(iter(list(messages)), timeout=60, metadata=metadata)


def _version(stub) -> int:
    return stub.GetStatus(tandem_pb2.StatusRequest(), timeout=10).weight_version


def test_pushes_of_bad_values_blocks_and_versions_change_nothing(tinystories_path, server, stub):
    before, version = greedy_tokens(stub), _version(stub)
    name, value = next(iter(hf_tensors(tinystories_path)))
    nan = value.clone()
    nan.view(-1)[7] = float("nan")
    err = _code(lambda: _push(stub, weight_messages([(name, nan)], version + 1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and name in err.details() and "non-finite" in err.details()
    msgs = list(weight_messages([(name, value)], version + 1, encoding="int8", block_size=256))
    msgs[1].tensor.block_size = MAX_QUANT_BLOCK * 2
    err = _code(lambda: _push(stub, msgs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "block_size" in err.details()
    for bad in (version, MAX_VERSION + 1):
        err = _code(lambda bad=bad: _push(stub, weight_messages([(name, value)], bad)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "header.version" in err.details()
    err = _code(lambda: _push(stub, weight_messages([(name, value)], version + 1, origin="o" * 40)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "header.origin" in err.details()
    assert _version(stub) == version and greedy_tokens(stub) == before
    assert health(server.address) == SERVING


def test_a_write_that_fails_part_way_rolls_back(tinystories_path, server, stub):
    """The third tensor of an update cannot be written (a meta tensor has no data): the first two must not stay."""
    before, version = greedy_tokens(stub), _version(stub)
    named = list(hf_tensors(tinystories_path))[:3]
    tensors = {n: t + 1.0 for n, t in named[:2]}
    tensors[named[2][0]] = torch.empty(named[2][1].shape, device="meta")
    update = StagedUpdate(version=version + 1, origin="doomed", lora=False, lora_scale=0.0, tensors=tensors,
                          num_tensors=3)
    updater = server.service.push_handler.swapper.updater

    def apply(engine):
        with pytest.raises(Exception):   # noqa: B017 - whatever torch raises for a meta tensor
            updater.apply(update)
        table = engine.runner.model.parameter_table()
        return [torch.equal(table[n].detach().cpu(), t) for n, t in named[:2]]

    assert server.loop.call(apply, timeout=60) == [True, True]
    assert _version(stub) == version and greedy_tokens(stub) == before


def test_a_swap_waits_at_most_the_swap_timeout_then_aborts_stragglers(tinystories_path):
    srv = start(tinystories_path, swap_timeout_s=0.0)
    try:
        channel, stub = stub_for(srv)
        long = stub.GenerateStream(request(*[GREEDY_PROMPT] * 8, temperature=0, max_new_tokens=480, ignore_eos=True),
                                   timeout=120)
        next(long)                                                  # running on version 0
        report = _push(stub, weight_messages(hf_tensors(tinystories_path), 1, origin="swap test"))
        assert report.version == 1
        err = _code(lambda: list(long))
        assert err.code() == grpc.StatusCode.ABORTED and "swap" in err.details() and "version 1" in err.details()
        after = stub.Generate(request(GREEDY_PROMPT, temperature=0, max_new_tokens=8), timeout=60)
        assert after.completions[0].weight_version == 1
        assert settled_status(stub).kv_blocks_free == settled_status(stub).kv_blocks_total
        channel.close()
    finally:
        srv.stop(grace=1.0)


# ---------------------------------------------------------------- 6: experience

def test_rollouts_reusing_a_rollout_id_one_after_the_other_all_complete(stub):
    for _ in range(12):
        rollout = tandem_pb2.RolloutRequest(prompts=[tandem_pb2.Prompt(token_ids=tandem_pb2.TokenIds(ids=GREEDY_PROMPT))],
                                            samples_per_prompt=2, rollout_id="same-id",
                                            params=tandem_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True))
        got = list(stub.StreamExperience(rollout, timeout=30))
        assert len(got) == 2 and all(len(e.response_token_ids) == 4 for e in got)
