"""The model runner against HF transformers: greedy tokens identical to `generate`, logits allclose."""

from __future__ import annotations

import pytest
import torch
from model_runner_checks import check_logits, greedy_generate, hf_greedy, hf_model

from common.errors import ConfigError, FieldError
from serving.batch import ScheduledChunk
from serving.engine.config import EngineConfig
from serving.engine.model_runner import ModelRunner
from serving.models.random_init import save_random_checkpoint

RANDOM_CONFIGS = {
    "llama-gqa": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                                initializer_range=0.2, rope_theta=500.0)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                        max_position_embeddings=256, init_std=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "opt-postln-proj": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=256, max_position_embeddings=256, init_std=0.2,
                                    do_layer_norm_before=False, word_embed_proj_dim=32,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256, initializer_range=0.2,
                          bos_token_id=0, eos_token_id=0)),
}


def check_against_hf(path, prompts: list[list[int]], max_new_tokens: int) -> None:
    runner = ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    ours, our_logits = greedy_generate(runner, prompts, max_new_tokens, chunk_size=7, block_size=4)
    reference = hf_model(path)
    for prompt, got, got_logits in zip(prompts, ours, our_logits):
        expected, expected_logits = hf_greedy(reference, prompt, max_new_tokens)
        # HF stops at EOS; ours runs on: the tokens up to and including EOS must agree exactly.
        assert got[:len(expected)] == expected, f"prompt of {len(prompt)} tokens diverged"
        assert len(set(got)) > 1 or len(expected) < 3, "degenerate output: the check would prove little"
        torch.testing.assert_close(torch.stack(got_logits[:len(expected)]), expected_logits, atol=1e-4, rtol=1e-4)
    check_logits(runner, reference, max(prompts, key=len))


@pytest.mark.parametrize("name", list(RANDOM_CONFIGS))
def test_random_model_greedy_matches_hf(name, tmp_path):
    arch, config = RANDOM_CONFIGS[name]
    path = save_random_checkpoint(tmp_path / name, arch, seed=0, **config)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (19, 3, 30, 1, 11)]
    check_against_hf(path, prompts, max_new_tokens=12)


def test_tinystories_greedy_matches_hf(tinystories_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tinystories_path))
    texts = ["Once upon a time, there was a little girl named", "The dog", "Tom and his friend Sam went to the park "
             "to play with a big red ball. They", "One day"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    check_against_hf(tinystories_path, prompts, max_new_tokens=24)


def test_info_and_tokenizer(tinystories_path):
    runner = ModelRunner(EngineConfig(model=str(tinystories_path), max_model_len=256))
    info = runner.info
    assert (info.architecture, info.num_layers, info.num_kv_heads, info.head_dim) == ("llama", 2, 4, 16)
    assert (info.vocab_size, info.max_model_len, info.eos_token_ids, info.bos_token_id) == (2048, 256, [2], 1)
    assert runner.tokenizer is not None and runner.tokenizer.eos_token_id == 2
    assert runner.kv_cache_bytes_per_block(16) == 2 * 2 * 16 * 4 * 16 * 4
    with pytest.raises(RuntimeError, match="allocate_kv_cache"):
        runner.run([ScheduledChunk(0, [1, 2], 0, [0], True)])
    with pytest.raises(ConfigError, match="max_model_len"):
        ModelRunner(EngineConfig(model=str(tinystories_path), max_model_len=4096))


def test_load_weights_is_all_or_nothing(tmp_path):
    arch, config = RANDOM_CONFIGS["llama-gqa"]
    path = save_random_checkpoint(tmp_path / "m", arch, **config)
    runner = ModelRunner(EngineConfig(model=str(path), device="cpu"))
    shapes = runner.hf_parameter_shapes()
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * 16, 64)
    before = {n: p.clone() for n, p in runner.model.parameter_table().items()}
    good = ("model.layers.0.mlp.up_proj.weight", torch.ones(shapes["model.layers.0.mlp.up_proj.weight"]))
    bad_batches = {
        "model.layers.1.mlp.down_proj.weight": [good, ("model.layers.1.mlp.down_proj.weight", torch.ones(3, 3))],
        "model.layers.9.mlp.nope.weight": [good, ("model.layers.9.mlp.nope.weight", torch.ones(3))],
        "model.norm.weight": [good, ("model.norm.weight", torch.ones(64, dtype=torch.long))],
    }
    for name, batch in bad_batches.items():
        with pytest.raises(FieldError) as err:
            runner.load_weights(batch)
        assert err.value.field == name
        for n, p in runner.model.parameter_table().items():
            assert torch.equal(p, before[n]), f"{n} changed by a rejected update"
    runner.load_weights([good, ("lm_head.weight", torch.zeros(256, 64, dtype=torch.bfloat16))])
    assert torch.equal(runner.model.model.layers[0].mlp.up_proj.weight, good[1])
    assert torch.count_nonzero(runner.model.lm_head.weight) == 0


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="supported: llama, opt, gpt2"):
        ModelRunner(EngineConfig(model=str(tmp_path)))
