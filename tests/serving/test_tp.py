"""Tensor-parallel serving on CPU (gloo ranks): outputs identical to tp=1, ~1/N of the sharded weights per
rank, sharded weight updates, refusal of indivisible head counts, and rank failure -> NOT_SERVING + exit 1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.results import TandemError
from common.errors import ConfigError, FieldError
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.models.gpt2 import GPT2LMHeadModel
from serving.models.llama import LlamaForCausalLM
from serving.models.random_init import save_random_checkpoint
from serving.parallel.runner import TPModelRunner
from serving.parallel.serve import build_tp_engine
from serving.parallel.tp import check_tensor_parallel, layout_of, shard_for_rank, unshard

STORY_PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up.",
    "Tom had a toy car.",
    "The sun was hot and the sky was blue.",
    "Once",
]
GQA_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, initializer_range=0.2)
GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)


def engine_config(path, **kw) -> EngineConfig:
    fields = dict(model=str(path), device="cpu", dtype="float32", token_budget=16, block_size=8, num_kv_blocks=64)
    fields.update(kw)
    return EngineConfig(**fields)


def generate(engine, prompts) -> list:
    return engine.generate(prompts, GREEDY)


def assert_same_outputs(tp_outputs, reference_outputs) -> None:
    for ours, ref in zip(tp_outputs, reference_outputs, strict=True):
        assert ours.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(ours.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ no processes


def test_shards_reassemble_to_the_full_tensor():
    torch.manual_seed(0)
    for name, shape in [("model.layers.0.self_attn.k_proj.weight", (8, 16)),     # column: [out, in]
                        ("model.layers.0.mlp.down_proj.weight", (16, 12)),       # row: [out, in]
                        ("transformer.h.0.attn.c_attn.weight", (16, 48)),        # fused q|k|v Conv1D [in, 3*out]
                        ("transformer.h.0.attn.c_attn.bias", (48,))]:
        full = torch.randn(shape)
        plan = (GPT2LMHeadModel if name.startswith("transformer.") else LlamaForCausalLM).tp_plan
        layout = layout_of(plan, name)
        shards = [shard_for_rank(plan, name, full, r, 2) for r in range(2)]
        for shard in shards:
            assert shard.shape[layout.dim] == full.shape[layout.dim] // 2
        assert torch.equal(unshard(plan, name, shards), full), name
    norm = torch.randn(16)
    assert shard_for_rank(LlamaForCausalLM.tp_plan, "model.norm.weight", norm, 1, 2) is norm                  # replicated
    with pytest.raises(FieldError, match="q_proj"):
        shard_for_rank(LlamaForCausalLM.tp_plan, "model.layers.0.self_attn.q_proj.weight", torch.zeros(6, 4), 0, 4)


def test_tp_refuses_head_counts_that_do_not_divide(tmp_path):
    from transformers import LlamaConfig

    path = save_random_checkpoint(tmp_path / "m", "llama", **{**GQA_LLAMA, "num_attention_heads": 6,
                                                              "num_key_value_heads": 3, "hidden_size": 48})
    with pytest.raises(ConfigError) as info:
        TPModelRunner(engine_config(path), 2)                       # refused before any rank is started
    message = str(info.value)
    assert info.value.field == "tp" and "tp=2" in message
    assert "query heads 6" in message and "kv heads 3" in message and "intermediate size 128" in message
    check_tensor_parallel(LlamaConfig(**{**GQA_LLAMA, "intermediate_size": 96, "num_attention_heads": 6,
                                         "num_key_value_heads": 3, "hidden_size": 48}), 3)   # divides: accepted
    with pytest.raises(ConfigError, match=r"not divisible by 2: intermediate size"):
        check_tensor_parallel(LlamaConfig(**{**GQA_LLAMA, "intermediate_size": 129}), 2)


# ------------------------------------------------------------------ 2 gloo ranks


@pytest.fixture(scope="module")
def gqa_path(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("gqa") / "llama", "llama", seed=3, **GQA_LLAMA)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tinystories", "random-gqa"])
def test_tp2_greedy_identical_to_tp1_and_half_the_sharded_weights_per_rank(model, request, tmp_path):
    path = request.getfixturevalue("tinystories_path" if model == "tinystories" else "gqa_path")
    reference = LLMEngine(engine_config(path))
    if model == "tinystories":
        prompts = STORY_PROMPTS                                     # the first is split across passes
    else:
        prompts = [list(range(3, 40)), [7, 8, 9], [200, 5, 17, 33, 90, 1], [42]]
    expected = generate(reference, prompts)
    engine = build_tp_engine(engine_config(path), 2)
    try:
        assert engine.info.tensor_parallel == 2 and engine.info.num_kv_heads == reference.info.num_kv_heads // 2
        assert_same_outputs(generate(engine, prompts), expected)

        memory = engine.runner.rank_memory()
        full_sharded = sum(p.numel() * p.element_size() for n, p in reference.runner.model.named_parameters()
                           if layout_of(reference.runner.model.tp_plan, n) is not None)
        full_kv = sum(c.numel() * c.element_size() for c in reference.runner.kv_caches)
        for rank, m in enumerate(memory):
            print(f"{model} tp=2 rank {rank}: sharded params {m['sharded_params']} B of {full_sharded} B "
                  f"({m['sharded_params'] / full_sharded:.2f}), replicated {m['replicated_params']} B, "
                  f"KV cache {m['kv_cache']} B of {full_kv} B")
            assert m["sharded_params"] == full_sharded // 2
            assert m["kv_cache"] == full_kv // 2

        if model == "random-gqa":                                  # a sharded weight update (full tensors in)
            new_path = save_random_checkpoint(tmp_path / "v1", "llama", seed=11, **GQA_LLAMA)
            from common.checkpoint import iter_checkpoint

            tensors = dict(iter_checkpoint(new_path))
            bad = dict(tensors, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(4, 64)})
            with pytest.raises(FieldError, match=r"up_proj.weight: shape \(4, 64\) does not match \(128, 64\)"):
                engine.runner.load_weights(bad.items())            # refused: nothing sent, nothing written
            assert_same_outputs(generate(engine, prompts[:2]), expected[:2])
            engine.runner.load_weights(tensors.items())
            for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight",
                         "model.norm.weight"):                     # gathered back from both ranks' shards
                assert torch.equal(engine.runner.full_parameter(name), tensors[name])
            engine.reset_prefix_cache()
            assert_same_outputs(generate(engine, prompts), generate(LLMEngine(engine_config(new_path)), prompts))
    finally:
        engine.runner.shutdown()
    assert [p.exitcode for p in engine.runner.workers] == [0]      # the stop message ended the worker cleanly


@pytest.mark.slow
def test_a_killed_rank_turns_health_not_serving_and_the_server_exits_nonzero(tinystories_path, tmp_path):
    script = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
              "from serving.engine.config import EngineConfig; from serving.rpc.server import ServerConfig; "
              "from serving.parallel.serve import serve_tensor_parallel; "
              f"sys.exit(serve_tensor_parallel(EngineConfig(model={str(tinystories_path)!r}, device='cpu', "
              "dtype='float32'), ServerConfig(port=0), 2, "
              "ready=lambda s: print('serving on', s.address, flush=True)))")
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("serving on"), log.read_text()
        address = ready.split()[-1]
        pids = re.search(r"tensor parallel: 2 ranks \(gloo\), pids \[(\d+), (\d+)\]", log.read_text())
        assert pids, log.read_text()
        worker_pid = int(pids.group(2))
        channel = grpc.insecure_channel(address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        from clients.client import TandemClient

        client = TandemClient(address, timeout=60)
        stream = client.generate_stream("Once upon a time", temperature=0, max_new_tokens=400, ignore_eos=True)
        assert next(stream).token_ids                               # a request is in flight on both ranks
        os.kill(worker_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        statuses = []
        try:
            for reply in watch:
                statuses.append(reply.status)
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
        except grpc.RpcError:
            pass
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        with pytest.raises(TandemError):                            # the in-flight stream fails, it does not hang
            for _ in stream:
                pass
        code = proc.wait(timeout=60)
        print(f"rank killed: NOT_SERVING reported, server exited with {code} after "
              f"{time.monotonic() - killed_at:.1f} s")
        assert code != 0, log.read_text()
        channel.close()
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
