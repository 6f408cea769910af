"""Model loading: checkpoint formats, config variants, and refusals with a field name."""

from __future__ import annotations

import shutil

import pytest
import torch
from model_runner_checks import check_logits, hf_model
from safetensors.torch import load_file, save_file

from common.errors import ConfigError
from serving.engine.config import EngineConfig
from serving.engine.model_runner import ModelRunner
from serving.models import load_model
from serving.models.random_init import save_random_checkpoint

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, initializer_range=0.2)


def assert_same_weights(model, reference) -> None:
    ours = model.parameter_table()
    theirs = reference.state_dict()
    for name, tensor in theirs.items():
        if name in ours:
            assert torch.equal(ours[name], tensor), name
    assert set(ours) <= set(theirs)


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch-bin"])
def test_checkpoint_layouts_load_exactly(layout, tmp_path):
    path = save_random_checkpoint(tmp_path / "src", "llama", **TINY_LLAMA, tie_word_embeddings=False)
    reference = hf_model(path)
    out = tmp_path / layout
    if layout == "sharded-safetensors":
        reference.save_pretrained(out, max_shard_size="100KB")
        assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    else:
        out.mkdir()
        shutil.copy(path / "config.json", out / "config.json")
        torch.save(reference.state_dict(), out / "pytorch_model.bin")
    model, config = load_model(out)
    assert config.model_type == "llama" and model.lm_head.weight is not model.model.embed_tokens.weight
    assert_same_weights(model, reference)


def test_llama_variants_match_hf_logits(tmp_path):
    """Linear RoPE scaling, biased projections, untied head, explicit head_dim."""
    path = save_random_checkpoint(
        tmp_path / "m", "llama", **TINY_LLAMA, attention_bias=True, tie_word_embeddings=False, head_dim=32,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0})
    runner = ModelRunner(EngineConfig(model=str(path), device="cpu"))
    assert runner.info.head_dim == 32
    check_logits(runner, hf_model(path), list(range(3, 40)))


def test_bfloat16_runs_close_to_float32(tinystories_path):
    from serving.batch import ScheduledChunk

    prompt = list(range(5, 45))
    logits = []
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner(EngineConfig(model=str(tinystories_path), dtype=dtype, device="cpu"))
        assert runner.info.dtype == getattr(torch, dtype)
        runner.allocate_kv_cache(8, 16)
        logits.append(runner.run([ScheduledChunk(0, prompt, 0, [3, 1, 2], True)])[0])
    assert logits[1].dtype == torch.float32
    assert logits[0].argmax() == logits[1].argmax()
    assert torch.allclose(logits[0], logits[1], atol=0.25)


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelRunner(EngineConfig(model=str(tmp_path)))
    path = save_random_checkpoint(tmp_path / "m", "llama", **TINY_LLAMA)
    with pytest.raises(ConfigError) as err:
        ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float16"))
    assert err.value.field == "dtype"
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(ConfigError, match="up_proj"):
        load_model(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="model.safetensors"):
        load_model(path)
