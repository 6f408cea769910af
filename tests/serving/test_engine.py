"""LLMEngine end to end on real checkpoints: greedy tokens identical to HF `generate` through split and
packed prompt chunks, scheduler invariants on real runs, preemption by recompute, prefix caching,
seeds, stop strings, min_new_tokens and request validation."""

from __future__ import annotations

import pytest
import torch

from common.errors import InvalidRequest
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.models.random_init import save_random_checkpoint

GREEDY = SamplingParams(temperature=0, max_new_tokens=20)

STORY_PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. Then a "
    "little dog came and looked at her with big eyes. Lily smiled and gave the dog a hug, and they played "
    "together all day until the sun went down.",                              # ~60 tokens: split across passes
    "Tom had a toy car.",
    "The sun was hot and the sky was blue. A small bird sat on a branch and sang a happy song for all the "
    "animals in the forest to hear.",
    "Once",
    "Sara and Ben went to the beach with mom and dad.",
]

RANDOM_CONFIGS = {
    "llama-gqa": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                                initializer_range=0.2)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                        max_position_embeddings=256, init_std=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256, initializer_range=0.2,
                          bos_token_id=0, eos_token_id=0)),
}


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """HF generate (greedy), one prompt at a time (no padding): tokens up to and including EOS, raw logprobs."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def story_engine(path, **kw) -> LLMEngine:
    cfg = dict(model=str(path), device="cpu", dtype="float32", token_budget=32, block_size=8)
    cfg.update(kw)
    kv_reserve = cfg.pop("kv_reserve", "worst_case")
    return LLMEngine(EngineConfig(**cfg), kv_reserve=kv_reserve)


@pytest.fixture(scope="module")
def story(tinystories_path):
    """(engine, HF greedy references {prompt: (tokens, logprobs)})."""
    from transformers import AutoModelForCausalLM

    engine = story_engine(tinystories_path)
    hf = AutoModelForCausalLM.from_pretrained(str(tinystories_path), dtype=torch.float32).eval()
    refs = {p: hf_greedy(hf, engine.encode(p), GREEDY.max_new_tokens) for p in STORY_PROMPTS}
    return engine, refs


def run_checked(engine: LLMEngine, requests: dict[str, tuple[str | list[int], SamplingParams]],
                abort_after: dict[str, int] | None = None, stagger: int = 0) -> dict[str, list]:
    """Drive step() to completion checking the scheduler's invariants on every pass; outputs per request.

    With `stagger` > 0 requests arrive over time: `stagger` more before each step."""
    abort_after = abort_after or {}
    arrivals = list(requests.items())
    outputs: dict[str, list] = {rid: [] for rid in requests}
    budget = engine.config.token_budget
    bm = engine.block_manager
    for _ in range(5000):
        for rid, (prompt, params) in arrivals[:stagger or len(arrivals)]:
            engine.add_request(rid, prompt, params)
        arrivals = arrivals[stagger or len(arrivals):]
        if not engine.has_unfinished_requests():
            break
        decoding = {s.seq_id for s in engine.scheduler.running if s.is_decoding}
        step_outputs = engine.step()
        batch = engine.last_schedule
        assert 0 < batch.num_tokens <= budget
        preempted = {s.seq_id for s in batch.preempted}
        assert {c.seq_id for c in batch.chunks[:batch.num_decode_chunks]} == decoding - preempted
        assert all(c.num_tokens == 1 for c in batch.chunks[:batch.num_decode_chunks])
        bm.assert_consistent(engine.scheduler.running)
        for out in step_outputs:
            outputs[out.request_id].append(out)
            if not out.finished and len(out.token_ids) == abort_after.get(out.request_id):
                free_before = bm.num_free_blocks
                engine.abort_request(out.request_id)
                assert bm.num_free_blocks > free_before, "abort frees the request's blocks at once"
    else:
        pytest.fail("the engine did not finish: deadlock or livelock")
    assert bm.num_free_blocks == bm.num_blocks, "every block is back on the free list"
    bm.assert_consistent([])
    return outputs


def test_tinystories_greedy_matches_hf_with_split_and_packed_prompts(story):
    engine, refs = story
    assert len(engine.encode(STORY_PROMPTS[0])) > engine.config.token_budget
    outs = engine.generate(STORY_PROMPTS, GREEDY)
    for prompt, out in zip(STORY_PROMPTS, outs):
        tokens, logprobs = refs[prompt]
        assert out.token_ids == tokens, f"diverged on {prompt[:30]!r}"
        assert out.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert out.finished and out.finish_reason in ("stop", "length")
        assert out.text == engine.tokenizer.decode(tokens, skip_special_tokens=True) or \
            out.text.strip() == engine.tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", list(RANDOM_CONFIGS))
def test_random_models_greedy_match_hf(name, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, config = RANDOM_CONFIGS[name]
    path = save_random_checkpoint(tmp_path / name, arch, seed=1, **config)
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", token_budget=16, block_size=4,
                                    num_kv_blocks=64))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (40, 3, 17, 1, 9)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 12)[0], f"{name}: prompt of {len(prompt)} tokens diverged"
        assert out.text == ""                                  # no tokenizer: token ids only


def test_burst_beyond_the_cache_completes_with_aborts_and_correct_tokens(story, tinystories_path):
    _, refs = story
    engine = story_engine(tinystories_path, num_kv_blocks=14, max_num_seqs=6)
    requests = {f"r{i}": (p, GREEDY) for i, p in enumerate(STORY_PROMPTS * 3)}
    long_enough = [rid for rid, (p, _) in requests.items() if len(refs[p][0]) > 8]
    aborts = {long_enough[0]: 3, long_enough[-1]: 6}
    outputs = run_checked(engine, requests, abort_after=aborts, stagger=2)
    assert engine.scheduler.num_preemptions == 0
    for rid, (prompt, _) in requests.items():
        if rid in aborts:
            assert not outputs[rid][-1].finished and len(outputs[rid][-1].token_ids) == aborts[rid]
            continue
        final = outputs[rid][-1]
        assert final.finished and final.token_ids == refs[prompt][0]
        assert [t for o in outputs[rid] for t in o.new_token_ids] == final.token_ids
        assert "".join(o.new_text for o in outputs[rid]) == final.text


def test_preemption_by_recompute_gives_the_same_greedy_tokens(story, tinystories_path):
    _, refs = story
    engine = story_engine(tinystories_path, num_kv_blocks=12, kv_reserve="none", enable_prefix_caching=False)
    requests = {f"r{i}": (p, GREEDY) for i, p in enumerate(STORY_PROMPTS * 2)}
    outputs = run_checked(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    for rid, (prompt, _) in requests.items():
        assert outputs[rid][-1].token_ids == refs[prompt][0]


def test_separate_prefill_decode_scheduling_gives_the_same_greedy_tokens(story, tinystories_path):
    _, refs = story
    engine = story_engine(tinystories_path, scheduling="separate", token_budget=24)
    outs = engine.generate(STORY_PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [refs[p][0] for p in STORY_PROMPTS]


def test_unseeded_sampling_is_reproducible_from_the_engine_seed(tinystories_path):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
    runs = [[o.token_ids for o in story_engine(tinystories_path, seed=s).generate(STORY_PROMPTS[1:3], params)]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_prefix_cache_hits_skip_work_and_keep_tokens(story):
    engine, refs = story
    prompt = STORY_PROMPTS[0]
    engine.generate([prompt], GREEDY)
    hits = engine.block_manager.prefix_hit_tokens
    out = engine.generate([prompt], GREEDY)[0]
    assert engine.block_manager.prefix_hit_tokens - hits >= len(engine.encode(prompt)) - engine.config.block_size
    assert out.token_ids == refs[prompt][0]
    engine.reset_prefix_cache()
    hits = engine.block_manager.prefix_hit_tokens
    assert engine.generate([prompt], GREEDY)[0].token_ids == refs[prompt][0]
    assert engine.block_manager.prefix_hit_tokens == hits


def test_seeded_sampling_is_independent_of_batch_companions_and_top_k_1_is_greedy(story):
    engine, refs = story
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_new_tokens=20, ignore_eos=True)
    alone = engine.generate([STORY_PROMPTS[1]], seeded)[0]
    others = SamplingParams(temperature=1.2, max_new_tokens=15)
    crowd = engine.generate([STORY_PROMPTS[0], STORY_PROMPTS[1], STORY_PROMPTS[2]], [others, seeded, others])[1]
    assert alone.token_ids == crowd.token_ids and len(alone.token_ids) == 20
    assert alone.logprobs == pytest.approx(crowd.logprobs, abs=1e-4)
    top1 = SamplingParams(temperature=0.8, top_k=1, max_new_tokens=20)
    assert [o.token_ids for o in engine.generate(STORY_PROMPTS[:3], top1)] == [refs[p][0] for p in STORY_PROMPTS[:3]]


def test_stop_string_cuts_text_and_deltas_concatenate(story):
    engine, _ = story
    prompt = STORY_PROMPTS[4]
    full = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=40))[0].text
    stop = full[len(full) // 2: len(full) // 2 + 6]
    assert len(engine.tokenizer.encode(stop, add_special_tokens=False)) > 1, "a multi-token stop string"
    outputs = run_checked(engine, {"s": (prompt, SamplingParams(temperature=0, max_new_tokens=40, stop=[stop]))})["s"]
    final = outputs[-1]
    assert final.finish_reason == "stop" and final.text == full[:full.find(stop)]
    assert "".join(o.new_text for o in outputs) == final.text
    assert all(stop[:2] not in o.new_text or stop[:2] in final.text for o in outputs)


def test_stop_token_ids_and_min_new_tokens(story):
    engine, refs = story
    prompt = STORY_PROMPTS[1]
    greedy = refs[prompt][0]
    out = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[greedy[2]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy[:3]
    out = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20, min_new_tokens=3,
                                                   stop_token_ids=[greedy[0]]))[0]
    assert greedy[0] not in out.token_ids[:3] and len(out.token_ids) >= 3


def test_context_limit_finishes_with_length(tinystories_path):
    engine = story_engine(tinystories_path, max_model_len=40)
    ids = engine.encode(STORY_PROMPTS[0])[:36]
    out = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_bad_requests_are_refused_naming_the_field(tinystories_path):
    engine = story_engine(tinystories_path, num_kv_blocks=8, max_model_len=128)
    cases = [("prompt", ""), ("prompt", []), ("prompt", [5, 2048]), ("prompt", [1, -1]), ("prompt", [3] * 128)]
    for field, prompt in cases:
        with pytest.raises(InvalidRequest) as err:
            engine.add_request("x", prompt, SamplingParams(max_new_tokens=4))
        assert err.value.field == field
    with pytest.raises(InvalidRequest) as err:          # worst case 100 tokens > 8 blocks of 8
        engine.add_request("x", [5, 6, 7], SamplingParams(max_new_tokens=97))
    assert err.value.field == "max_new_tokens"
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("x", "Hi", SamplingParams(temperature=float("nan")))
    assert err.value.field == "temperature"
    engine.add_request("x", "Hi", SamplingParams(max_new_tokens=4))
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("x", "Hi", SamplingParams(max_new_tokens=4))
    assert err.value.field == "request_id"
    assert not engine.has_unfinished_requests() or engine.stats().waiting == 1
    engine.abort_request("x")
    assert not engine.has_unfinished_requests()
    stats = engine.stats()
    assert (stats.kv_blocks_total, stats.kv_blocks_free, stats.block_size, stats.max_model_len) == (8, 8, 8, 128)


def test_many_concurrent_decodes_of_mixed_lengths_match_hf(tmp_path):
    """Enough sequences decode at once that attention runs in several length buckets."""
    from transformers import AutoModelForCausalLM

    from serving.layers.attention import DECODES_PER_BUCKET

    arch, config = RANDOM_CONFIGS["llama-gqa"]
    path = save_random_checkpoint(tmp_path / "llama", arch, seed=2, **config)
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", token_budget=256, block_size=4,
                                    num_kv_blocks=1024))
    gen = torch.Generator().manual_seed(5)
    count = 4 * DECODES_PER_BUCKET
    prompts = [torch.randint(3, 256, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 120, (count,), generator=gen)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = hf_greedy(hf, prompt, 8)
        assert out.token_ids[:len(tokens)] == tokens, f"prompt of {len(prompt)} tokens diverged"
        assert out.logprobs[:len(tokens)] == pytest.approx(logprobs, abs=1e-4)
