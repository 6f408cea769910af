"""Weight sync: staging, checks, the atomic swap, LoRA merges, the drain policy, and pushes over real gRPC.

Everything runs on TinyStories-656K (a real checkpoint) with the real engine; references are HF
`generate` (greedy) of the same weights. Engine-level tests drive the stage and the swap directly;
the gRPC tests run the real server on 127.0.0.1 (serving.rpc.server.start_server, whose PushWeights
delegates to serving.rpc.push_service) and skip with a reason if that delegation is missing.
"""

from __future__ import annotations

import copy
import threading
from concurrent import futures

import grpc
import pytest
import torch

from clients.weight_push import StreamingPush, lora_adapter, push_weights, weight_messages
from common.errors import FieldError, InvalidRequest
from protos import tandem_pb2, tandem_pb2_grpc
from protos.auth import NOT_CONFIGURED, PushAuth, bearer_metadata
from protos.codec import roundtrip
from serving.engine.config import EngineConfig
from serving.engine.sampling_params import SamplingParams
from serving.weights.stage import StagedUpdate, WeightStage
from serving.weights.swap import WeightSwapper, WeightUpdater

NEW = 10   # greedy tokens per prompt (EOS masked until then, in the engine and in HF alike)
TEXTS = ["Once upon a time, there was a little girl named", "The dog ran to the park and", "Tom had a red ball."]


@pytest.fixture(scope="module")
def hf_base(tinystories_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tinystories_path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tinystories_path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tinystories_path))
    return [tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def engine(tinystories_path):
    from serving.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(tinystories_path), num_kv_blocks=96, token_budget=32))


def perturbed(hf_base, seed: int, scale: float = 0.1) -> list[tuple[str, torch.Tensor]]:
    """New weights for every parameter (tied ones once), noise relative to each tensor's spread."""
    g = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + scale * p.detach().std() * torch.randn(p.shape, generator=g))
            for n, p in hf_base.named_parameters()]


def hf_with(hf_base, named) -> torch.nn.Module:
    model = copy.deepcopy(hf_base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in named:
            params[name].copy_(value)
    return model


def hf_greedy(model, prompts) -> list[list[int]]:
    out = []
    for ids in prompts:
        seq = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        out.append(seq[0, len(ids):].tolist())
    return out


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW, min_new_tokens=NEW)


def engine_greedy(engine, prompts) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(prompts, GREEDY)]


def stage(engine, messages) -> StagedUpdate:
    s = WeightStage(engine.runner.hf_parameter_shapes(), engine.weight_version,
                    conv1d=engine.info.architecture == "gpt2")
    for m in messages:
        s.feed(m)
    return s.result()


def served_weights(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.runner.model.parameter_table().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert not changed, f"weights changed: {changed}"


# ---------------------------------------------------------------- engine level: exact pushes, drift

@pytest.mark.parametrize("encoding", ["float32", "bfloat16", "int8", "int4"])
def test_pushed_weights_serve_like_hf_generate_of_the_pushed_checkpoint(engine, hf_base, prompts, encoding):
    named = perturbed(hf_base, seed=1)
    update = stage(engine, weight_messages(named, engine.weight_version + 1, encoding=encoding, block_size=64,
                                           chunk_bytes=8192))
    WeightUpdater(engine).apply(update)
    assert engine.weight_version == update.version
    # what the wire carries: exact for fp32, bf16-rounded for bf16, per-block dequantized for int8/int4
    received = [(n, roundtrip(v, encoding, 64)) for n, v in named]
    if encoding == "bfloat16":
        assert all(torch.equal(r, v.to(torch.bfloat16).float()) for (_, r), (_, v) in zip(received, named))
    outputs = engine_greedy(engine, prompts)
    assert outputs == hf_greedy(hf_with(hf_base, received), prompts)
    if encoding in ("int8", "int4"):            # drift against the unquantized weights, measured here
        ids = torch.tensor([prompts[0]])
        exact, served = hf_with(hf_base, named)(ids).logits, hf_with(hf_base, received)(ids).logits
        drift = (exact - served).abs().max().item()
        agree = (exact.argmax(-1) == served.argmax(-1)).float().mean().item()
        assert drift < (1.0 if encoding == "int8" else 8.0), f"{encoding}: max |dlogit| {drift:.4f}"
        assert agree >= (0.9 if encoding == "int8" else 0.6), f"{encoding}: greedy agreement {agree:.2f}"


def test_a_failing_swap_changes_nothing(engine, hf_base):
    before, version = served_weights(engine), engine.weight_version
    named = perturbed(hf_base, seed=2)
    bad = dict(named)
    bad["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)      # passes no stage; the runner's own check
    update = StagedUpdate(version=version + 1, origin="bad", lora=False, lora_scale=0.0, tensors=bad,
                          num_tensors=len(bad))
    with pytest.raises(FieldError, match="model.layers.1.mlp.down_proj.weight"):
        WeightUpdater(engine).apply(update)
    assert engine.weight_version == version
    assert_same_weights(before, served_weights(engine))


def _chunks(engine, named, **kw):
    return list(weight_messages(named, engine.weight_version + 1, **kw))


def _rejections(engine, hf_base):
    named = perturbed(hf_base, seed=3)[:4]
    name0 = named[0][0]
    good = _chunks(engine, named, chunk_bytes=4096)
    wrong_sum = good[:-1] + [tandem_pb2.WeightChunk(commit=tandem_pb2.WeightCommit(checksum="0" * 64))]
    wrong_shape = _chunks(engine, [(name0, torch.zeros(7, 5))])
    unknown = _chunks(engine, [("model.layers.9.mlp.up_proj.weight", torch.zeros(384, 128))])
    old = list(weight_messages(named, engine.weight_version))
    twice = _chunks(engine, [named[1], named[1]])
    # chunks of two tensors interleaved
    a, b = _chunks(engine, [named[0]], chunk_bytes=4096), _chunks(engine, [named[2]], chunk_bytes=4096)
    interleaved = [a[0], a[1], b[1]] + a[2:]
    lora_q = "model.layers.0.self_attn.q_proj"
    lora = dict(lora=True, lora_scale=2.0)
    lora_bad_in = _chunks(engine, [(f"{lora_q}.lora_A.weight", torch.zeros(4, 100)),
                                   (f"{lora_q}.lora_B.weight", torch.zeros(128, 4))], **lora)
    lora_rank = _chunks(engine, [(f"{lora_q}.lora_A.weight", torch.zeros(4, 128)),
                                 (f"{lora_q}.lora_B.weight", torch.zeros(128, 2))], **lora)
    lora_alone = _chunks(engine, [(f"{lora_q}.lora_A.default.weight", torch.zeros(4, 128))], **lora)
    lora_embed = _chunks(engine, [("model.embed_tokens.lora_A.weight", torch.zeros(4, 128))], **lora)
    return {
        "bad checksum": (wrong_sum, "commit.checksum"),
        "wrong shape": (wrong_shape, name0),
        "unknown name": (unknown, "model.layers.9.mlp.up_proj.weight"),
        "stale version": (old, "header.version"),
        "no header": (good[1:], "header"),
        "no commit": (good[:-1], "commit"),
        "sent twice": (twice, named[1][0]),
        "interleaved chunks": (interleaved, name0),
        "header count": (list(weight_messages(named, engine.weight_version + 1, num_tensors=5)), "header.num_tensors"),
        "lora A in-dim": (lora_bad_in, f"{lora_q}.lora_A.weight"),
        "lora rank mismatch": (lora_rank, f"{lora_q}.lora_B.weight"),
        "lora pair missing": (lora_alone, f"{lora_q}.weight"),
        "lora on embeddings": (lora_embed, "model.embed_tokens.lora_A.weight"),
    }


def test_bad_pushes_are_rejected_naming_the_field_and_change_nothing(engine, hf_base):
    before, version = served_weights(engine), engine.weight_version
    for case, (messages, field) in _rejections(engine, hf_base).items():
        with pytest.raises(InvalidRequest) as err:
            stage(engine, messages)
        assert err.value.field == field, f"{case}: {err.value}"
    assert engine.weight_version == version
    assert_same_weights(before, served_weights(engine))


# ---------------------------------------------------------------- LoRA

def _adapter_folder(hf_base, tmp_path, seed: int, targets: list[str], r: int = 4):
    """A real peft adapter folder (random non-zero A and B) and the HF model with it merged in."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf_base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                              init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    folder = tmp_path / f"adapter{seed}"
    model.save_pretrained(str(folder))
    return folder, model.merge_and_unload().eval()


def test_lora_pushes_serve_base_plus_adapter_not_increments(engine, hf_base, prompts, tmp_path):
    prompts = prompts[:2]
    base = perturbed(hf_base, seed=4)
    updater = WeightUpdater(engine)
    updater.apply(stage(engine, weight_messages(base, engine.weight_version + 1)))
    hf_b = hf_with(hf_base, base)
    for seed, targets in ((5, ["q_proj", "v_proj", "up_proj"]), (6, ["k_proj", "down_proj"])):
        folder, merged = _adapter_folder(hf_b, tmp_path, seed, targets)
        tensors, scale = lora_adapter(folder)
        assert scale == 2.0 and any(".lora_A." in n for n, _ in tensors)
        update = stage(engine, weight_messages(tensors, engine.weight_version + 1, lora=True, lora_scale=scale))
        updater.apply(update)
        assert engine_greedy(engine, prompts) == hf_greedy(merged, prompts)
    # a full push replaces the base; the matrices under the adapter are its values from then on
    updater.apply(stage(engine, weight_messages(base, engine.weight_version + 1)))
    assert not updater.lora_base
    assert engine_greedy(engine, prompts) == hf_greedy(hf_b, prompts)


def test_lora_on_gpt2_conv1d_weights_is_transposed_into_place(tmp_path, prompts):
    """GPT-2 keeps Conv1D weights as [in, out]; peft's adapters are [r, in] / [out, r] (fan_in_fan_out)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    from serving.engine.engine import LLMEngine
    from serving.models.random_init import save_random_checkpoint

    folder = save_random_checkpoint(tmp_path / "gpt2", "gpt2", seed=0, n_embd=64, n_layer=2, n_head=4,
                                    vocab_size=2048, n_positions=128, initializer_range=0.2)
    gpt2 = LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=32, token_budget=32))
    hf = GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    torch.manual_seed(9)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                              fan_in_fan_out=True, init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    tensors, scale = lora_adapter(tmp_path / "adapter")
    WeightUpdater(gpt2).apply(stage(gpt2, weight_messages(tensors, 1, lora=True, lora_scale=scale)))
    merged = peft_model.merge_and_unload().eval()
    assert engine_greedy(gpt2, prompts[:2]) == hf_greedy(merged, prompts[:2]) != hf_greedy(hf, prompts[:2])


def test_promote_refuses_bad_options_naming_them(tmp_path, capsys):
    import argparse

    from cli import promote

    parser = argparse.ArgumentParser(prog="tandem")
    promote.add_parser(parser.add_subparsers())
    (tmp_path / "ckpt").mkdir()
    cases = {("--token-file", str(tmp_path / "missing")): "--token-file", ("--quantize", "int8", "--bf16"): "--bf16",
             ("--block-size", "3"): "--block-size"}
    for extra, option in cases.items():
        args = parser.parse_args(["promote", str(tmp_path / "ckpt"), "--server", "127.0.0.1:1", *extra])
        with pytest.raises(SystemExit) as exit_:
            args.run(args)
        assert exit_.value.code == 2 and option in capsys.readouterr().err


# ---------------------------------------------------------------- the drain policy

def test_drain_finishes_in_flight_requests_on_the_old_weights(engine, hf_base, prompts):
    prompts = prompts[:2]
    updater, old, new = WeightUpdater(engine), perturbed(hf_base, seed=7), perturbed(hf_base, seed=8)
    updater.apply(stage(engine, weight_messages(old, engine.weight_version + 1)))
    v_old = engine.weight_version
    ref_old, ref_new = hf_greedy(hf_with(hf_base, old), prompts), hf_greedy(hf_with(hf_base, new), prompts)
    for i, ids in enumerate(prompts):
        engine.add_request(f"drain-{i}", ids, GREEDY)
    outputs = {}
    for _ in range(3):
        outputs.update({o.request_id: o for o in engine.step()})
    swapper = WeightSwapper(updater)
    future = swapper.request(stage(engine, weight_messages(new, v_old + 1)))
    assert swapper.holding
    while engine.has_unfinished_requests():
        assert not swapper.before_step(engine) and not future.done()     # never mid-flight
        outputs.update({o.request_id: o for o in engine.step()})
        assert all(o.weight_version == v_old for o in outputs.values())
    assert engine.block_manager.hash_to_block        # the old weights' KV blocks are cached ...
    assert swapper.before_step(engine) and future.result().version == v_old + 1
    assert not engine.block_manager.hash_to_block    # ... and forgotten at the swap
    assert [outputs[f"drain-{i}"].token_ids for i in range(len(prompts))] == ref_old
    after = engine.generate(prompts, GREEDY)         # the same prompts: no stale prefix-cache hit
    assert [o.token_ids for o in after] == ref_new and {o.weight_version for o in after} == {v_old + 1}
    assert engine.weight_origin == f"push v{v_old + 1}"


def test_push_auth_checks_the_bearer_token_in_constant_time_form(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    auth = PushAuth.from_sources(token_file, env={})
    assert auth.failure(bearer_metadata("s3cret")) is None
    assert "wrong" in auth.failure(bearer_metadata("s3cret2"))
    assert "missing" in auth.failure([])
    assert "Bearer" in auth.failure([("authorization", "s3cret")])
    assert PushAuth.from_sources(None, env={"TANDEM_PUSH_TOKEN": "t"}).failure(bearer_metadata("t")) is None
    assert PushAuth.from_sources(None, env={}).failure(bearer_metadata("s3cret")) == NOT_CONFIGURED
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(FieldError, match="push_token_file"):
        PushAuth.from_sources(empty)


# ---------------------------------------------------------------- over gRPC: the real server on 127.0.0.1

TOKEN = "tandem-test-token"


@pytest.fixture(scope="module")
def server(tinystories_path, tmp_path_factory):
    from serving.rpc import server as server_module

    if not hasattr(server_module, "start_server") or "PushWeights" not in vars(server_module.GenerationService):
        pytest.skip("serving/rpc/server.py does not delegate PushWeights to serving.rpc.push_service yet")
    token_file = tmp_path_factory.mktemp("auth") / "push_token"
    token_file.write_text(TOKEN + "\n")
    srv = server_module.start_server(EngineConfig(model=str(tinystories_path), num_kv_blocks=96, token_budget=32),
                                     port=0, push_token_file=str(token_file))
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield tandem_pb2_grpc.GenerationStub(channel)


def unary_greedy(stub, prompts) -> list[tandem_pb2.Completion]:
    request = tandem_pb2.GenerateRequest(
        prompts=[tandem_pb2.Prompt(token_ids=tandem_pb2.TokenIds(ids=p)) for p in prompts],
        params=tandem_pb2.SamplingParams(temperature=0.0, max_new_tokens=NEW, min_new_tokens=NEW))
    return list(stub.Generate(request, timeout=60).completions)


def weights_of(server) -> dict[str, torch.Tensor]:
    return server.loop.call(served_weights, timeout=60)


def test_promoted_checkpoint_serves_like_hf_generate_and_status_shows_it(server, stub, hf_base, prompts, tmp_path):
    from cli import promote

    named = perturbed(hf_base, seed=11)
    model = hf_with(hf_base, named)
    model.save_pretrained(str(tmp_path / "ckpt"))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    import argparse

    parser = argparse.ArgumentParser(prog="tandem")
    promote.add_parser(parser.add_subparsers())
    args = parser.parse_args(["promote", str(tmp_path / "ckpt"), "--server", server.address,
                              "--token-file", str(token_file)])
    version = stub.GetStatus(tandem_pb2.StatusRequest()).weight_version
    assert args.run(args) == 0
    status = stub.GetStatus(tandem_pb2.StatusRequest())
    assert status.weight_version == version + 1 and status.weight_origin == str((tmp_path / "ckpt").resolve())
    completions = unary_greedy(stub, prompts)
    assert [list(c.token_ids) for c in completions] == hf_greedy(model, prompts)
    assert {c.weight_version for c in completions} == {version + 1}


def test_unauthenticated_pushes_get_unauthenticated_and_change_nothing(server, stub, hf_base):
    before = weights_of(server)
    version = stub.GetStatus(tandem_pb2.StatusRequest()).weight_version
    named = perturbed(hf_base, seed=12)
    for token in (None, "wrong-token"):
        with pytest.raises(Exception) as err:
            push_weights(server.address, named, token=token, version=version + 1)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED, err.value
    # a server with no token configured refuses every push, and says how to configure one
    from serving.rpc import server as server_module
    from serving.rpc.push_service import WeightPushHandler

    swapper = server.service.push_handler.swapper
    open_service = server_module.GenerationService(server.loop, "no-token", WeightPushHandler(PushAuth(None), swapper))
    other = grpc.server(futures.ThreadPoolExecutor(2))
    tandem_pb2_grpc.add_GenerationServicer_to_server(open_service, other)
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        with pytest.raises(Exception) as err:
            push_weights(f"127.0.0.1:{port}", named, token=TOKEN, version=version + 1)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "--push-token-file" in err.value.details
    finally:
        other.stop(0)
    assert stub.GetStatus(tandem_pb2.StatusRequest()).weight_version == version
    assert_same_weights(before, weights_of(server))


def test_push_over_tls_with_the_token(server, stub, hf_base, tmp_path):
    """TLS is optional: the same handler behind a TLS port (a self-signed certificate made here)."""
    import shutil
    import subprocess

    from protos.auth import ServerTLS, channel_credentials
    from serving.rpc import server as server_module
    from serving.rpc.push_service import WeightPushHandler

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    handler = WeightPushHandler(PushAuth(TOKEN), server.service.push_handler.swapper)
    tls = grpc.server(futures.ThreadPoolExecutor(2))
    tandem_pb2_grpc.add_GenerationServicer_to_server(server_module.GenerationService(server.loop, "tls", handler), tls)
    port = tls.add_secure_port("127.0.0.1:0", ServerTLS(str(cert), str(key)).credentials())
    tls.start()
    try:
        version = stub.GetStatus(tandem_pb2.StatusRequest()).weight_version
        named = perturbed(hf_base, seed=16)[:3]
        report = push_weights(f"localhost:{port}", named, token=TOKEN, credentials=channel_credentials(cert),
                              encoding="bfloat16")
        assert report.version == version + 1 == stub.GetStatus(tandem_pb2.StatusRequest()).weight_version
        served = weights_of(server)
        assert all(torch.equal(served[n], v.to(torch.bfloat16).float()) for n, v in named)
    finally:
        tls.stop(0)


def test_cut_off_or_corrupt_pushes_leave_the_old_version_whole(server, stub, hf_base, prompts):
    before = weights_of(server)
    version = stub.GetStatus(tandem_pb2.StatusRequest()).weight_version
    reference = [list(c.token_ids) for c in unary_greedy(stub, prompts)]
    named = perturbed(hf_base, seed=13)
    half = len(named) // 2

    def killed():                        # the pusher dies halfway: the stream is aborted, no commit
        for i, (name, value) in enumerate(named):
            if i == half:
                raise RuntimeError("pusher killed")
            yield name, value

    with pytest.raises(RuntimeError, match="pusher killed"):
        push_weights(server.address, killed(), token=TOKEN, version=version + 1)
    metadata = bearer_metadata(TOKEN)
    no_commit = weight_messages(named, version + 1, commit=False)      # stream closed without a commit
    with pytest.raises(grpc.RpcError) as err:
        stub.PushWeights(no_commit, metadata=metadata, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "without a commit" in err.value.details()
    corrupt = list(weight_messages(named, version + 1))
    corrupt[3].tensor.data = bytes(len(corrupt[3].tensor.data))       # flipped on the way: checksum catches it
    with pytest.raises(grpc.RpcError) as err:
        stub.PushWeights(iter(corrupt), metadata=metadata, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "commit.checksum" in err.value.details()
    wrong = weight_messages([("model.layers.0.self_attn.k_proj.weight", torch.zeros(128, 128))], version + 1)
    with pytest.raises(grpc.RpcError) as err:
        stub.PushWeights(wrong, metadata=metadata, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.layers.0.self_attn.k_proj.weight" in err.value.details() and "(64, 128)" in err.value.details()
    assert stub.GetStatus(tandem_pb2.StatusRequest()).weight_version == version
    assert_same_weights(before, weights_of(server))
    assert [list(c.token_ids) for c in unary_greedy(stub, prompts)] == reference


def test_requests_in_flight_finish_on_the_old_version_and_later_ones_get_the_new(server, stub, hf_base, prompts):
    old, new = perturbed(hf_base, seed=14), perturbed(hf_base, seed=15)
    version = stub.GetStatus(tandem_pb2.StatusRequest()).weight_version
    with StreamingPush(server.address, token=TOKEN, version=version + 1, num_tensors=len(old)) as push:
        for name, value in old:          # as a ZeRO-3 learner sends them: one gathered tensor at a time
            push.send(name, value)
        assert push.commit().version == version + 1
    ref = {version + 1: hf_greedy(hf_with(hf_base, old), prompts),
           version + 2: hf_greedy(hf_with(hf_base, new), prompts)}
    long = tandem_pb2.SamplingParams(temperature=0.0, max_new_tokens=NEW, min_new_tokens=NEW)
    streams, first_delta = [], threading.Barrier(len(prompts) + 1, timeout=60)
    results: dict[int, tuple[list[int], set[int]]] = {}

    def consume(i: int) -> None:
        request = tandem_pb2.GenerateRequest(prompts=[tandem_pb2.Prompt(token_ids=tandem_pb2.TokenIds(ids=prompts[i]))],
                                             params=long)
        tokens, versions = [], set()
        for n, delta in enumerate(stub.GenerateStream(request, timeout=60)):
            tokens += delta.token_ids
            versions.add(delta.weight_version)
            if n == 0:
                first_delta.wait()
        results[i] = (tokens, versions)

    for i in range(len(prompts)):
        streams.append(threading.Thread(target=consume, args=(i,)))
        streams[-1].start()
    first_delta.wait()                   # every stream has output: all are in flight when the push comes
    report = push_weights(server.address, new, token=TOKEN, version=version + 2, encoding="float32")
    for t in streams:
        t.join(60)
    assert report.version == version + 2 and report.tensors == len(new) and report.bytes_received > 0
    for i, (tokens, versions) in results.items():
        assert versions == {version + 1} and tokens == ref[version + 1][i], f"stream {i}"
    after = unary_greedy(stub, prompts)
    assert [list(c.token_ids) for c in after] == ref[version + 2]
    assert {c.weight_version for c in after} == {version + 2}
