"""The gRPC server against the real engine on TinyStories-656K, over real gRPC on 127.0.0.1."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import tandem_pb2, tandem_pb2_grpc
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.rpc.server import SERVICE_NAME, GenerationServer, ServerConfig

PROMPTS = [
    "Once upon a time",
    "Tom and Lily went to the park. They saw a big dog and",
    "The cat",
    "One day, a little bird flew into the garden. The bird was sad because it had lost its mother. "
    "A kind girl named Sue saw the bird and wanted to help. She looked everywhere",
    "Ben had a red ball.",
    "Mom said, \"Let's bake a cake!\"",
    "There was a big tree near the house. Every morning,",
    "Spot",
]


@pytest.fixture(scope="module")
def server(tinystories_path):
    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", token_budget=128))
    srv = GenerationServer(engine, ServerConfig(host="127.0.0.1", port=0), model_name="tinystories")
    srv.start()
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield tandem_pb2_grpc.GenerationStub(channel)


def request(*prompts, request_id: str = "", **params) -> tandem_pb2.GenerateRequest:
    msgs = [tandem_pb2.Prompt(text=p) if isinstance(p, str) else tandem_pb2.Prompt(token_ids=tandem_pb2.TokenIds(ids=p))
            for p in prompts]
    return tandem_pb2.GenerateRequest(prompts=msgs, params=tandem_pb2.SamplingParams(**params), request_id=request_id)


def status(stub) -> tandem_pb2.ServerStatus:
    return stub.GetStatus(tandem_pb2.StatusRequest(), timeout=10)


def wait_all_blocks_free(stub, timeout: float = 10.0) -> tandem_pb2.ServerStatus:
    deadline = time.monotonic() + timeout
    while True:
        s = status(stub)
        if (s.kv_blocks_free == s.kv_blocks_total and s.running == 0 and s.waiting == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_health_serving_and_status_fields(server, stub):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    for name in ("", SERVICE_NAME):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    s = status(stub)
    assert s.model == "tinystories" and s.weight_version == 0 and s.weight_origin
    assert s.tensor_parallel == 1 and s.device == "cpu" and s.dtype == "float32"
    assert s.block_size == 16 and s.token_budget == 128 and s.max_model_len == 512
    assert s.kv_blocks_total > 0 and 0 <= s.kv_blocks_free <= s.kv_blocks_total
    assert s.uptime_s > 0 and s.running >= 0 and s.waiting >= 0
    assert len(s.instance_id) == 32 and status(stub).instance_id == s.instance_id   # one id per process


def test_32_concurrent_streams_equal_unary_results(stub):
    version = status(stub).weight_version
    token_prompts = [[1, 300 + 7 * i, 400 + i, 17] for i in range(4)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(28)] + token_prompts
    lengths = [8 + (i * 7) % 41 for i in range(len(prompts))]
    unary = [stub.Generate(request(p, temperature=0.0, max_new_tokens=n), timeout=60).completions[0]
             for p, n in zip(prompts, lengths)]
    streams: list[list[tandem_pb2.GenerateDelta]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            for delta in stub.GenerateStream(request(prompts[i], temperature=0.0, max_new_tokens=lengths[i]),
                                             timeout=120):
                streams[i].append(delta)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors[:3]
    for i, (deltas, done) in enumerate(zip(streams, unary)):
        assert deltas, f"stream {i} sent nothing"
        assert "".join(d.text for d in deltas) == done.text, f"stream {i}"
        assert [t for d in deltas for t in d.token_ids] == list(done.token_ids), f"stream {i}"
        logprobs = [x for d in deltas for x in d.logprobs]
        assert len(logprobs) == len(done.token_ids)
        assert all(abs(a - b) < 1e-3 for a, b in zip(logprobs, done.logprobs))
        assert list(deltas[0].prompt_token_ids) == list(done.prompt_token_ids)
        assert all(not d.prompt_token_ids for d in deltas[1:])
        assert deltas[-1].finish_reason in (tandem_pb2.FINISH_REASON_STOP, tandem_pb2.FINISH_REASON_LENGTH)
        assert all(d.finish_reason == tandem_pb2.FINISH_REASON_UNSPECIFIED for d in deltas[:-1])
        assert deltas[-1].finish_reason == done.finish_reason
        assert len({d.request_id for d in deltas}) == 1 and deltas[0].request_id
        assert all(d.weight_version == done.weight_version == version for d in deltas)
    assert token_prompts[0] == list(unary[28].prompt_token_ids)


def test_batch_completions_come_back_in_prompt_order(stub):
    batch = stub.Generate(request(*PROMPTS[:4], temperature=0.0, max_new_tokens=12, request_id="batch-order"),
                          timeout=60)
    assert batch.request_id == "batch-order"
    assert [c.index for c in batch.completions] == [0, 1, 2, 3]
    for i, c in enumerate(batch.completions):
        single = stub.Generate(request(PROMPTS[i], temperature=0.0, max_new_tokens=12), timeout=60).completions[0]
        assert c.token_ids == single.token_ids and c.text == single.text


BAD_REQUESTS = {
    "empty prompt list": (tandem_pb2.GenerateRequest(), "prompts:"),
    "prompt with neither kind": (tandem_pb2.GenerateRequest(prompts=[tandem_pb2.Prompt()]), "prompts[0]:"),
    "empty text prompt": (request(""), "prompts[0].text"),
    "empty token ids": (request([]), "prompts[0].token_ids"),
    "token id out of vocab": (request("ok", [1, 5000]), "prompts[1].token_ids.ids[1]"),
    "negative token id": (request([-1]), "prompts[0].token_ids.ids[0]"),
    "prompt longer than the context": (request("fine", [5] * 600), "prompts[1]: prompt is longer than the model context"),
    "temperature negative": (request("x", temperature=-0.5), "params.temperature"),
    "temperature nan": (request("x", temperature=math.nan), "params.temperature"),
    "temperature inf": (request("x", temperature=math.inf), "params.temperature"),
    "top_p 0": (request("x", top_p=0.0), "params.top_p"),
    "top_p 1.5": (request("x", top_p=1.5), "params.top_p"),
    "top_k negative": (request("x", top_k=-1), "params.top_k"),
    "max_new_tokens 0": (request("x", max_new_tokens=0), "params.max_new_tokens"),
    "max_new_tokens negative": (request("x", max_new_tokens=-3), "params.max_new_tokens"),
    "min_new_tokens > max_new_tokens": (request("x", max_new_tokens=4, min_new_tokens=5), "params.min_new_tokens"),
    "empty stop string": (request("x", stop=["ok", ""]), "params.stop"),
    "stop token id out of vocab": (request("x", stop_token_ids=[2, 99999]), "params.stop_token_ids[1]"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_invalid_request_is_invalid_argument_naming_the_field(stub, case):
    bad, field = BAD_REQUESTS[case]
    for call in (lambda: stub.Generate(bad, timeout=10), lambda: list(stub.GenerateStream(bad, timeout=10))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details()
    good = stub.Generate(request("Once upon a time", temperature=0.0, max_new_tokens=3), timeout=30)
    assert len(good.completions[0].token_ids) >= 1


def test_bad_prompt_late_in_a_batch_runs_none_of_it(stub):
    before = wait_all_blocks_free(stub)
    bad = request("Once upon a time", "The cat", [1, 2, 3], [7] * 700, max_new_tokens=50)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(bad, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts[3]" in info.value.details()
    after = status(stub)
    assert after.tokens_generated == before.tokens_generated
    assert after.requests_finished == before.requests_finished and after.running == 0 and after.waiting == 0


def test_duplicate_request_id_in_flight_is_refused(stub):
    long = request("Once upon a time", max_new_tokens=400, ignore_eos=True, request_id="same-id")
    first = stub.GenerateStream(long, timeout=60)
    next(first)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(long, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in info.value.details()
    first.cancel()
    assert wait_all_blocks_free(stub).kv_blocks_free == status(stub).kv_blocks_total


def test_cancelled_stream_frees_its_kv_blocks(stub):
    total = wait_all_blocks_free(stub).kv_blocks_total
    stream = stub.GenerateStream(request(PROMPTS[3], PROMPTS[1], max_new_tokens=450, ignore_eos=True), timeout=60)
    for _ in range(4):
        next(stream)
    busy = status(stub)
    assert busy.running == 2 and busy.kv_blocks_free < total
    finished_before = busy.requests_finished
    stream.cancel()
    after = wait_all_blocks_free(stub)
    assert after.kv_blocks_free == total and after.running == 0
    assert after.requests_finished == finished_before      # aborted, not run to the end


def test_deadline_aborts_the_request_and_frees_its_blocks(stub):
    before = wait_all_blocks_free(stub)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request(*prompts, max_new_tokens=480, ignore_eos=True), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = wait_all_blocks_free(stub)
    assert time.monotonic() - t0 < 10
    assert after.kv_blocks_free == after.kv_blocks_total and after.running == 0 and after.waiting == 0
    assert after.requests_finished == before.requests_finished


def test_graceful_stop_lets_in_flight_requests_finish(tinystories_path):
    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", num_kv_blocks=128))
    srv = GenerationServer(engine, ServerConfig(port=0, grace_s=20.0), model_name="tinystories")
    srv.start()
    channel = grpc.insecure_channel(srv.address)
    stub = tandem_pb2_grpc.GenerationStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    stream = stub.GenerateStream(request("Once upon a time", max_new_tokens=200, ignore_eos=True), timeout=60)
    first = next(stream)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    rest = list(stream)                       # the in-flight stream runs to its end within the grace period
    stopper.join(timeout=30)
    assert not stopper.is_alive()
    tokens = len(first.token_ids) + sum(len(d.token_ids) for d in rest)
    assert tokens == 200 and rest[-1].finish_reason == tandem_pb2.FINISH_REASON_LENGTH
    with pytest.raises(grpc.RpcError):        # nothing is accepted any more
        health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2)
    assert srv.wait(timeout=1) == 0 and not srv.loop.alive
    channel.close()


def test_engine_crash_fails_pending_rpcs_and_goes_not_serving(tinystories_path):
    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", num_kv_blocks=128))
    srv = GenerationServer(engine, ServerConfig(port=0), model_name="tinystories")
    srv.start()
    channel = grpc.insecure_channel(srv.address)
    stub = tandem_pb2_grpc.GenerationStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    stub.Generate(request("Once upon a time", max_new_tokens=4), timeout=30)      # healthy first
    real_step = engine.step
    steps = {"n": 0}

    def failing_step():   # fault injection into the real engine: the 3rd step from now raises
        steps["n"] += 1
        if steps["n"] == 3:
            raise RuntimeError("injected fault in step")
        return real_step()

    engine.step = failing_step
    stream = stub.GenerateStream(request("Once upon a time", max_new_tokens=100, ignore_eos=True), timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.INTERNAL and "injected fault in step" in info.value.details()
    assert srv.wait(timeout=10) == 1                 # serve() would exit non-zero
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request("Once", max_new_tokens=4), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    srv.stop(grace=1.0)
    channel.close()


def test_second_stop_request_cancels_in_flight_requests(tinystories_path):
    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", num_kv_blocks=128))
    srv = GenerationServer(engine, ServerConfig(port=0, grace_s=60.0), model_name="tinystories")
    srv.start()
    channel = grpc.insecure_channel(srv.address)
    stub = tandem_pb2_grpc.GenerationStub(channel)
    stream = stub.GenerateStream(request("Once upon a time", max_new_tokens=480, ignore_eos=True), timeout=60)
    next(stream)
    srv.request_stop()                        # first SIGTERM: wait() returns, serve() calls stop()
    assert srv.wait(timeout=1) == 0
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    srv.request_stop()                        # second SIGTERM: do not wait out the 60 s grace period
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE      # "Cancelling all calls"
    stopper.join(timeout=30)
    assert not stopper.is_alive() and time.monotonic() - t0 < 20
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total   # the loop aborted it
    channel.close()


class HoldGate:
    """A gate as serving.weights.swap.WeightSwapper implements it: holds new batches until released."""

    def __init__(self):
        self.holding = True
        self.passes = 0

    def before_step(self, engine) -> bool:
        self.passes += 1
        if self.holding and not engine.has_unfinished_requests() and self.passes > 3:
            self.holding = False
            return True
        return False


def test_gate_holds_new_batches_until_it_opens(tinystories_path):
    from serving.engine.loop import EngineLoop, RequestStream
    from serving.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", num_kv_blocks=64))
    gate = HoldGate()
    loop = EngineLoop(engine, gate=gate)
    loop.start()
    stream = RequestStream(["held-0"])
    loop.submit(stream, [[1, 80, 147]], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert loop.call(lambda e: e.has_unfinished_requests()) is False and gate.holding   # held, not added
    while gate.holding:
        loop.call(lambda e: None)                 # each wake-up lets the gate look again
    outputs = list(stream)
    assert outputs[-1][1].finished and len(outputs[-1][1].token_ids) == 4
    loop.stop()


def test_a_taken_port_is_a_config_error_naming_the_port(server, tinystories_path):
    from common.errors import ConfigError

    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", num_kv_blocks=16))
    second = GenerationServer(engine, ServerConfig(port=server.port), model_name="tinystories")
    with pytest.raises(ConfigError) as info:
        second.start()
    assert info.value.field == "port" and str(server.port) in str(info.value)
