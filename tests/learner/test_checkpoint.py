"""DeepSpeed engines (ZeRO-3, one process), LoRA, and checkpoints round-tripping through HF from_pretrained."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from common.errors import ConfigError
from learner import checkpoint, ds, modeling
from learner.config import DeepSpeedOptions, LoraOptions

TEXTS = ["Once upon a time there was a cat.", "The dog ran to the park and played.",
         "Lily had a red ball.", "Tom saw a big tree in the garden."]


def _batch(tok):
    return tok(TEXTS, return_tensors="pt", padding=True)


def test_zero3_trains_and_save_hf_roundtrips(tinystories_path, tmp_path):
    tok = modeling.load_tokenizer(tinystories_path)
    engine = ds.init_engine(modeling.load_causal_lm(tinystories_path), DeepSpeedOptions(zero_stage=3),
                            batch_size=4, grad_accum=1, lr=1e-3, weight_decay=0.0)
    batch = _batch(tok)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    losses = []
    for _ in range(4):
        loss = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    # parameters are really partitioned: the engine's module holds empty shards
    assert any(p.numel() == 0 for p in engine.module.parameters())

    out = checkpoint.save_hf(engine, tok, tmp_path / "hf")
    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    engine.eval()
    with torch.no_grad():
        ours = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        theirs = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ours, theirs)
    assert modeling.load_tokenizer(out)(TEXTS[0]).input_ids == tok(TEXTS[0]).input_ids

    # resumable: a fresh engine loads the DeepSpeed checkpoint and computes the same logits
    checkpoint.save_resumable(engine, tmp_path / "ds", "step4")
    fresh = ds.init_engine(modeling.load_causal_lm(tinystories_path), DeepSpeedOptions(zero_stage=3),
                           batch_size=4, grad_accum=1, lr=1e-3, weight_decay=0.0)
    assert checkpoint.load_resumable(fresh, tmp_path / "ds") == "step4"
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, ours)


def test_value_model_lora_fused_on_export(tinystories_path, tmp_path):
    tok = modeling.load_tokenizer(tinystories_path)
    model = modeling.ValueModel.from_pretrained(tinystories_path)
    lm = modeling.load_causal_lm(tinystories_path)
    # the tied-embedding gotcha: the value model keeps the LM's trained embeddings
    torch.testing.assert_close(model.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)
    modeling.apply_lora(model, LoraOptions(lora_dim=4, only_optimize_lora=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head") for n in trainable)
    engine = ds.init_engine(model, DeepSpeedOptions(zero_stage=3), batch_size=4, grad_accum=1, lr=1e-2,
                            weight_decay=0.0)
    batch = _batch(tok)
    target = torch.tensor([1.0, -1.0, 1.0, -1.0])
    for _ in range(3):
        loss = ((engine.module.score(batch.input_ids, batch.attention_mask) - target) ** 2).mean()
        engine.backward(loss)
        engine.step()
    out = checkpoint.save_hf(engine, tok, tmp_path / "rm", value_head=True)
    _, info = AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reloaded = modeling.ValueModel.from_pretrained(out)
    assert not any(modeling.is_lora_layer(m) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded.score(batch.input_ids, batch.attention_mask),
                                   engine.module.score(batch.input_ids, batch.attention_mask), atol=1e-5, rtol=1e-4)


def test_score_reads_last_real_token_for_both_paddings():
    mask_right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    mask_left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert modeling.last_token_index(mask_right).tolist() == [2, 3, 0]
    assert modeling.last_token_index(mask_left).tolist() == [3, 3, 3]


def test_missing_tokenizer_and_model_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        modeling.load_tokenizer(tmp_path / "nope")
    assert err.value.field == "tokenizer"
    with pytest.raises(ConfigError) as err:
        modeling.load_causal_lm(tmp_path)
    assert err.value.field == "model"


def test_zero_plus_plus_options_reach_deepspeed(tinystories_path):
    """`--zero_quantized_gradients --zero_hpz_partition_size 1` end up in the engine's own ZeRO config and
    the engine trains (on CPU they change no numbers); `--zero_quantized_weights` is refused on CPU naming
    the field (DeepSpeed's CPU backend has no quantizer op); outside stage 3 they are refused, naming
    zero_stage."""
    import torch

    from common.errors import ConfigError
    from learner.cli_args import parse_config

    config = parse_config("sft", ["--zero_stage", "3", "--zero_quantized_gradients", "true",
                                  "--zero_hpz_partition_size", "1"])
    tok = modeling.load_tokenizer(tinystories_path)
    engine = ds.init_engine(modeling.load_causal_lm(tinystories_path), config.deepspeed, batch_size=4, grad_accum=1,
                            lr=1e-3, weight_decay=0.0)
    # DeepSpeed's parsed config, not ours
    assert engine.zero_quantized_gradients() and engine.zero_hpz_partition_size() == 1
    assert not engine.zero_quantized_weights()
    batch = _batch(tok)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    losses = []
    for _ in range(3):
        loss = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    qwz = parse_config("sft", ["--zero_stage", "3", "--zero_quantized_weights", "true"]).deepspeed
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            ds.ds_config(qwz, batch_size=4, grad_accum=1, lr=1e-3, weight_decay=0.0)
        assert err.value.field == "zero_quantized_weights" and "CUDA" in err.value.message
    with pytest.raises(ConfigError) as err:
        parse_config("sft", ["--zero_stage", "2", "--zero_quantized_weights", "true"])
    assert err.value.field == "zero_stage"
