"""Two-phase weight pushes against the real server (TinyStories-656K on 127.0.0.1): a `prepare_only` push is
staged and checked but applies nothing until FinishPush commits it; and through a balancer, a push that one
replica refuses is applied by none, so replicas never serve different versions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest

from clients.weight_push import current_version, hf_tensors, push_weights, weight_messages
from protos import tandem_pb2, tandem_pb2_grpc
from protos.auth import bearer_metadata
from serving.engine.config import EngineConfig
from serving.rpc.server import start_server

TOKEN = "two-phase-token"
AUTH = bearer_metadata(TOKEN)


def prepared_push(stub, tensors, version: int, metadata=AUTH) -> tandem_pb2.PushResult:
    messages = list(weight_messages(tensors, version, origin=f"two-phase v{version}"))
    commit = messages[-1].commit
    messages[-1] = tandem_pb2.WeightChunk(commit=tandem_pb2.WeightCommit(checksum=commit.checksum, prepare_only=True))
    return stub.PushWeights(iter(messages), timeout=120, metadata=metadata)


def greedy(stub) -> list[int]:
    request = tandem_pb2.GenerateRequest(prompts=[tandem_pb2.Prompt(text="Once upon a time")],
                                         params=tandem_pb2.SamplingParams(temperature=0, max_new_tokens=12))
    return list(stub.Generate(request, timeout=60).completions[0].token_ids)


@pytest.fixture(scope="module")
def server(tinystories_path, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN)
    srv = start_server(EngineConfig(model=str(tinystories_path), device="cpu", num_kv_blocks=256), port=0,
                       push_token_file=str(token_file))
    yield srv
    srv.stop(grace=1.0)


def test_a_prepared_push_applies_nothing_until_it_is_committed(server, tinystories_path):
    with grpc.insecure_channel(server.address) as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        before, tokens = stub.GetStatus(tandem_pb2.StatusRequest()).weight_version, greedy(stub)
        negated = [(n, t.neg() if n == "model.norm.weight" else t) for n, t in hf_tensors(tinystories_path)]  # logits negated
        result = prepared_push(stub, negated, before + 1)
        assert result.prepared and result.version == before and result.tensors == len(negated)
        assert stub.GetStatus(tandem_pb2.StatusRequest()).weight_version == before and greedy(stub) == tokens

        finish = tandem_pb2.FinishPushRequest(version=before + 1, commit=True)
        with pytest.raises(grpc.RpcError) as err:                                     # the credential first
            stub.FinishPush(finish, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:                                     # not the prepared version
            stub.FinishPush(tandem_pb2.FinishPushRequest(version=before + 7, commit=True), timeout=30, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "version" in err.value.details()
        assert stub.GetStatus(tandem_pb2.StatusRequest()).weight_version == before

        done = stub.FinishPush(finish, timeout=60, metadata=AUTH)
        assert done.version == before + 1 and not done.prepared
        assert stub.GetStatus(tandem_pb2.StatusRequest()).weight_version == before + 1 and greedy(stub) != tokens
        with pytest.raises(grpc.RpcError) as err:                                     # consumed: once only
            stub.FinishPush(finish, timeout=30, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        restored = list(hf_tensors(tinystories_path))
        assert prepared_push(stub, restored, before + 2).prepared
        dropped = stub.FinishPush(tandem_pb2.FinishPushRequest(version=before + 2, commit=False), timeout=30,
                                  metadata=AUTH)
        assert dropped.version == before + 1                                          # aborted: nothing applied
        assert stub.GetStatus(tandem_pb2.StatusRequest()).weight_version == before + 1


def _replica(model, token: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving", "--log-level", "WARNING", "--model", str(model),
                             "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "TANDEM_PUSH_TOKEN": token})


@pytest.mark.slow
def test_through_a_balancer_a_push_one_replica_refuses_is_applied_by_none(tinystories_path, tmp_path):
    from serving.fleet.balancer import Balancer, BalancerConfig
    from serving.fleet.replicas import wait_for_replicas

    procs = [_replica(tinystories_path, TOKEN) for _ in range(2)]
    balancer = None
    try:
        addresses = [p.stdout.readline().split()[-1] for p in procs]
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        balancer = Balancer(BalancerConfig(backends=addresses, port=0, push_token_file=str(token_file)))
        balancer.start()
        wait_for_replicas(balancer, timeout_s=60)
        tensors = list(hf_tensors(tinystories_path))
        push_weights(addresses[0], tensors, token=TOKEN, version=5)      # replica 0 alone is ahead
        assert [current_version(a) for a in addresses] == [5, 0]
        from clients.results import TandemError

        with pytest.raises(TandemError) as err:                          # 3 <= 5: replica 0 refuses it
            push_weights(balancer.address, tensors, token=TOKEN, version=3)
        assert addresses[0] in err.value.details and "no replica applied it" in err.value.details
        assert [current_version(a) for a in addresses] == [5, 0]         # replica 1 did not take v3 either
        report = push_weights(balancer.address, tensors, token=TOKEN, version=6)
        assert report.version == 6 and [current_version(a) for a in addresses] == [6, 6]

        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

        with grpc.insecure_channel(balancer.address) as channel:      # the balancer reflects the contract too
            db = ProtoReflectionDescriptorDatabase(channel)
            assert {"tandem.v1.Generation", "grpc.health.v1.Health"} <= set(db.get_services())
            methods = {m.name for m in db.FindFileContainingSymbol("tandem.v1.Generation").service[0].method}
            assert {"Generate", "PushWeights", "FinishPush"} <= methods
    finally:
        if balancer is not None:
            balancer.stop(0)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
