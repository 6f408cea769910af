"""A real in-process server for the robustness tests: TinyStories-656K, real gRPC on 127.0.0.1, a push
credential, small limits (so each limit is cheap to reach), and helpers that read its state over gRPC."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import tandem_pb2, tandem_pb2_grpc
from protos.auth import PushAuth, bearer_metadata
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.limits import RequestLimits
from serving.rpc.push_service import WeightPushHandler
from serving.rpc.server import GenerationServer, ServerConfig

TOKEN = "robust-test-token"
AUTH = bearer_metadata(TOKEN)
LIMITS = RequestLimits(max_prompts=8, max_samples=16, max_id_chars=32, max_stop_strings=4, max_stop_chars=16,
                       max_stop_token_ids=2048, max_request_tokens=4000, max_message_bytes=2 << 20, max_pending=16)
GREEDY_PROMPT = [1, 300, 400, 17]


def start(model_path, *, limits: RequestLimits = LIMITS, swap_timeout_s: float = 30.0, **engine) -> GenerationServer:
    eng = LLMEngine(EngineConfig(model=str(model_path), device="cpu", token_budget=128, **engine))
    handler = WeightPushHandler.for_engine(eng, PushAuth(TOKEN), swap_timeout_s=swap_timeout_s, limits=limits)
    server = GenerationServer(eng, ServerConfig(host="127.0.0.1", port=0, limits=limits,
                                                swap_timeout_s=swap_timeout_s), model_name="tinystories",
                              push_handler=handler)
    server.start()
    return server


def request(*prompts, request_id: str = "", **params) -> tandem_pb2.GenerateRequest:
    msgs = [tandem_pb2.Prompt(text=p) if isinstance(p, str) else tandem_pb2.Prompt(token_ids=tandem_pb2.TokenIds(ids=p))
            for p in prompts]
    return tandem_pb2.GenerateRequest(prompts=msgs, params=tandem_pb2.SamplingParams(**params), request_id=request_id)


def greedy_tokens(stub, prompt=GREEDY_PROMPT, n: int = 24) -> list[int]:
    reply = stub.Generate(request(prompt, temperature=0, max_new_tokens=n, ignore_eos=True), timeout=60)
    return list(reply.completions[0].token_ids)


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


SERVING = health_pb2.HealthCheckResponse.SERVING


def settled_status(stub, timeout: float = 30.0) -> tandem_pb2.ServerStatus:
    """The status once nothing runs or waits (cancellations are applied at the next step boundary)."""
    deadline = time.monotonic() + timeout
    while True:
        s = stub.GetStatus(tandem_pb2.StatusRequest(), timeout=10)
        if (s.running == 0 and s.waiting == 0 and s.kv_blocks_free == s.kv_blocks_total) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def stub_for(server) -> tuple[grpc.Channel, tandem_pb2_grpc.GenerationStub]:
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    return channel, tandem_pb2_grpc.GenerationStub(channel)
