"""The OpenAI-compatible HTTP front, against a real server (gRPC and HTTP over one engine loop, on
127.0.0.1) with TinyStories-656K, driven by the official `openai` package and by plain httpx."""

from __future__ import annotations

import math
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos import tandem_pb2, tandem_pb2_grpc
from protos.auth import PushAuth
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.rpc.push_service import WeightPushHandler
from serving.rpc.server import GenerationServer, ServerConfig

MODEL = "tinystories-656k"
PROMPT = "Once upon a time, there was a little"


def make_server(model_path, **fields) -> GenerationServer:
    engine = LLMEngine(EngineConfig(model=str(model_path), device="cpu", token_budget=128))
    pushes = WeightPushHandler.for_engine(engine, PushAuth(None))       # no credential: every push is refused
    server = GenerationServer(engine, ServerConfig(host="127.0.0.1", port=0, **fields), model_name=str(model_path),
                              push_handler=pushes)
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tinystories_path):
    srv = make_server(tinystories_path, http_port=0)
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def base(server) -> str:
    return f"http://{server.http.address}"


@pytest.fixture(scope="module")
def client(base):
    with openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield tandem_pb2_grpc.GenerationStub(channel)


def grpc_generate(stub, prompt: str, **params) -> tandem_pb2.GenerateResponse:
    return stub.Generate(tandem_pb2.GenerateRequest(prompts=[tandem_pb2.Prompt(text=prompt)],
                                                    params=tandem_pb2.SamplingParams(**params)), timeout=120)


def wait_idle(stub, timeout: float = 30.0) -> tandem_pb2.ServerStatus:
    deadline = time.monotonic() + timeout
    while True:
        s = stub.GetStatus(tandem_pb2.StatusRequest(), timeout=10)
        if (s.running == 0 and s.waiting == 0 and s.kv_blocks_free == s.kv_blocks_total) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def error_param(err: openai.APIStatusError):
    body = err.body if isinstance(err.body, dict) else {}
    return body.get("error", body).get("param")


# ---------------------------------------------------------------- the endpoints


def test_models_and_health(client, base):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["weight_version"] == 0
    assert httpx.get(base + "/health").json() == {"status": "ok"}


def test_greedy_completion_equals_grpc(client, stub):
    http = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    rpc = grpc_generate(stub, PROMPT, temperature=0, max_new_tokens=24).completions[0]
    assert http.choices[0].text == rpc.text and rpc.text
    assert http.usage.prompt_tokens == len(rpc.prompt_token_ids)
    assert http.usage.completion_tokens == len(rpc.token_ids)
    assert http.choices[0].finish_reason == "length"
    assert http.system_fingerprint == "tandem-weights-v0"


def test_token_id_prompt_and_echo(client, stub):
    ids = list(grpc_generate(stub, PROMPT, temperature=0, max_new_tokens=1).completions[0].prompt_token_ids)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + by_text.choices[0].text


def test_streamed_completion_equals_unary(client):
    unary = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_unary_and_streaming(client):
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A story about a cat"}]
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    choice = unary.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.prompt_tokens == unary.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


def test_n2_with_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7, n=2,
                                    logprobs=3)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text != out.choices[1].text          # seeds 7 and 8
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7, n=2)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]   # seeded: replays exactly
    for choice in out.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
        assert "".join(lp.tokens) == choice.text
        for sampled, top in zip(lp.token_logprobs, lp.top_logprobs):
            assert 1 <= len(top) <= 3
            assert sampled <= max(top.values()) + 1e-5
    assert out.usage.completion_tokens == 24
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, logprobs=1)
    words = greedy.choices[0].text.split()       # SentencePiece word starts ("▁home") keep their space
    assert len(words) > 5 and "".join(greedy.choices[0].logprobs.tokens) == greedy.choices[0].text


def test_chat_top_logprobs_greedy(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
                                         temperature=0, logprobs=True, top_logprobs=4)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 4
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)   # greedy = the best


def test_chat_processed_logprobs_are_of_the_kept_tokens(client):
    """logprobs_mode "processed" (an extension, as top_k): with top_k 3 the top list is the 3 kept tokens, whose
    probabilities sum to 1, and the sampled token's logprob is its own entry there."""
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
                                         temperature=0.7, seed=3, logprobs=True, top_logprobs=5,
                                         extra_body={"top_k": 3, "logprobs_mode": "processed"})
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens > 0
    for item in content:
        assert len(item.top_logprobs) == 3
        assert sum(math.exp(t.logprob) for t in item.top_logprobs) == pytest.approx(1.0, abs=1e-4)
        assert any(t.bytes == item.bytes and t.logprob == pytest.approx(item.logprob, abs=1e-6)
                   for t in item.top_logprobs)


BAD_COMPLETIONS = [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"), ({"stop": [""]}, "stop"), ({"prompt": []}, "prompt"),
    ({"prompt": [[5, 99999]]}, "prompt"), ({"seed": -3}, "seed"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"echo": True, "logprobs": 1}, "echo"), ({"temperature": "hot"}, "temperature"), ({"best_of": 3}, "best_of"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"min_tokens": 50}, "min_tokens"),
    ({"logprobs_mode": "processed_logprobs"}, "logprobs_mode"), ({"logprobs_mode": 1}, "logprobs_mode"),
]


@pytest.mark.parametrize("patch,param", BAD_COMPLETIONS, ids=[p for _, p in BAD_COMPLETIONS])
def test_bad_completion_parameter_is_400_naming_it(base, patch, param):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, **patch}
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


BAD_CHATS = [({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
             ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
             ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
             ({"max_completion_tokens": -1}, "max_completion_tokens"), ({"tools": [{"type": "function"}]}, "tools")]


@pytest.mark.parametrize("patch,param", BAD_CHATS, ids=[p for _, p in BAD_CHATS])
def test_bad_chat_parameter_is_400_naming_it(base, patch, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **patch}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_errors_through_the_openai_client_and_the_server_keeps_serving(client, base):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, top_p=1.5)
    assert error_param(err.value) == "top_p"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=8)
    assert error_param(err.value) == "model"
    r = httpx.post(base + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text


def test_disconnects_cancel_and_free_kv_blocks(base, stub):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", base + "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()          # held: a dropped iterator closes the response (a disconnect)
            assert next(lines).startswith("data: ")
            busy = stub.GetStatus(tandem_pb2.StatusRequest(), timeout=10)
            assert busy.running + busy.waiting == 1 and busy.kv_blocks_free < busy.kv_blocks_total
    s = wait_idle(stub)
    assert (s.running, s.waiting, s.kv_blocks_free) == (0, 0, s.kv_blocks_total)
    finished = s.requests_finished
    with pytest.raises(httpx.ReadTimeout):          # a unary client that gives up
        httpx.post(base + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    s = wait_idle(stub)
    assert (s.running, s.waiting, s.kv_blocks_free) == (0, 0, s.kv_blocks_total)
    assert s.requests_finished == finished          # aborted, not run to the end


# ---------------------------------------------------------------- metrics


def scrape(base: str) -> dict[str, dict]:
    families = text_string_to_metric_families(httpx.get(base + "/metrics").text)
    return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples} for f in families}


def value(metrics, family: str, sample: str | None = None, **labels) -> float:
    wanted = {**labels, "model_name": MODEL}
    return sum(v for (name, lab), v in metrics[family].items()
               if name == (sample or family) and all(dict(lab).get(k) == x for k, x in wanted.items()))


VLLM_SERIES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
               "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions", "vllm:prompt_tokens",
               "vllm:generation_tokens", "vllm:request_success", "vllm:time_to_first_token_seconds",
               "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",
               "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds", "tandem:weight_version",
               "tandem:weight_pushes", "tandem:weight_swap_pause_seconds"]


def test_metrics_exist_and_move(client, base, stub):
    wait_idle(stub)
    before = scrape(base)
    assert set(VLLM_SERIES) <= set(before), set(VLLM_SERIES) - set(before)
    long_prompt = (PROMPT + " girl named Lily. She liked to play in the park with her dog Max. One day, Lily and Max") * 2
    out, out2 = (client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=9, temperature=0,
                                           extra_body={"ignore_eos": True}) for _ in range(2))
    assert out.usage.prompt_tokens >= 32           # two full KV blocks the second request finds cached
    with pytest.raises(grpc.RpcError) as err:       # a push without the credential is refused
        stub.PushWeights(iter([tandem_pb2.WeightChunk(header=tandem_pb2.WeightHeader(version=1))]), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = scrape(base)
    prompt = out.usage.prompt_tokens + out2.usage.prompt_tokens
    assert value(after, "vllm:prompt_tokens", "vllm:prompt_tokens_total") - \
        value(before, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == prompt
    assert value(after, "vllm:generation_tokens", "vllm:generation_tokens_total") - \
        value(before, "vllm:generation_tokens", "vllm:generation_tokens_total") == 18
    success = "vllm:request_success_total"
    assert value(after, "vllm:request_success", success, finished_reason="length") - \
        value(before, "vllm:request_success", success, finished_reason="length") == 2
    for hist in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds"):
        assert value(after, hist, hist + "_count") - value(before, hist, hist + "_count") == 2
    itl = "vllm:inter_token_latency_seconds"
    assert value(after, itl, itl + "_count") - value(before, itl, itl + "_count") == 16
    # the second request found the first one's prompt blocks cached
    assert value(after, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") > \
        value(before, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
    assert value(after, "tandem:weight_pushes", "tandem:weight_pushes_total", result="unauthenticated") == \
        value(before, "tandem:weight_pushes", "tandem:weight_pushes_total", result="unauthenticated") + 1
    assert value(after, "tandem:weight_version") == 0
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:kv_cache_usage_perc") == 0


# ---------------------------------------------------------------- API key, reflection, standalone metrics


def test_api_key(tinystories_path, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    srv = make_server(tinystories_path, http_port=0, api_key_file=str(key))
    try:
        url = f"http://{srv.http.address}/v1"
        with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as bad_client:
            with pytest.raises(openai.AuthenticationError):
                bad_client.models.list()
        assert httpx.post(url + "/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
        with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0) as good:
            assert good.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).usage.completion_tokens >= 1
        assert httpx.get(f"http://{srv.http.address}/health").status_code == 200
    finally:
        srv.stop(grace=1.0)


def test_reflection_lists_services_and_metrics_port(tinystories_path):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    srv = make_server(tinystories_path, metrics_port=0)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            services = set(db.get_services())
            assert {"tandem.v1.Generation", "grpc.health.v1.Health"} <= services
            methods = {m.name for m in db.FindFileContainingSymbol("tandem.v1.Generation").service[0].method}
            assert {"Generate", "GenerateStream", "GetStatus", "PushWeights"} <= methods
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Generation"))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert srv.http is None
        text = httpx.get(f"http://127.0.0.1:{srv.metrics_port}/metrics").text
        assert "vllm:num_requests_running" in text
    finally:
        srv.stop(grace=1.0)


# ---------------------------------------------------------------- one set of limits for both fronts

def test_both_fronts_share_the_request_limits_and_the_pending_count(tinystories_path):
    """The HTTP front obeys the server's request limits (400 naming the parameter) and its running +
    queued count: slots held over gRPC make HTTP answer 429, and slots held over HTTP make gRPC answer
    RESOURCE_EXHAUSTED; both recover once the slots come back."""
    from serving.limits import RequestLimits

    srv = make_server(tinystories_path, http_port=0,
                      limits=RequestLimits(max_pending=4, max_prompts=4, max_samples=4, max_stop_strings=2))
    base = f"http://{srv.http.address}"
    try:
        with grpc.insecure_channel(srv.address) as channel, httpx.Client(base_url=base, timeout=120) as http:
            stub = tandem_pb2_grpc.GenerationStub(channel)
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "stop": ["a", "b", "c"]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
            assert "max_stop_strings=2" in r.json()["error"]["message"]
            long = tandem_pb2.GenerateRequest(prompts=[tandem_pb2.Prompt(text=PROMPT)] * 4,
                                              params=tandem_pb2.SamplingParams(temperature=0, max_new_tokens=400,
                                                                               ignore_eos=True))
            busy = stub.GenerateStream(long, timeout=120)
            next(busy)                                               # 4 of 4 slots held over gRPC
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 4})
            assert r.status_code == 429 and "max_pending=4" in r.json()["error"]["message"]
            busy.cancel()
            wait_idle(stub)
            deadline = time.monotonic() + 30                      # the cancelled call's slots come back
            while srv.service.admission.held and time.monotonic() < deadline:
                time.sleep(0.02)
            with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": [PROMPT] * 4,
                                                              "max_tokens": 400, "ignore_eos": True,
                                                              "temperature": 0, "stream": True}) as held:
                assert held.status_code == 200
                lines = held.iter_lines()                            # kept: a dropped iterator closes the stream
                next(lines)                                          # 4 of 4 slots held over HTTP
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(tandem_pb2.GenerateRequest(prompts=[tandem_pb2.Prompt(text="Once")]), timeout=30)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            wait_idle(stub)
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    finally:
        srv.stop(grace=1.0)
