"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen (loss on the response by default)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from common.errors import ConfigError
from learner import checkpoint, ds
from learner.config import SFTConfig
from learner.data import CausalLMCollator, SFTDataset
from learner.ds import all_sum, loader, seed_everything, to_device
from learner.inputs import cache_dir, check_inputs, model_path, step_samples, tokenizer_path
from learner.metrics import MetricsLogger
from learner.modeling import apply_lora, enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from learner.train_loop import train

log = logging.getLogger(__name__)


def causal_lm_loss(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over the labelled tokens of one micro-batch."""
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, {"samples": float(batch["input_ids"].shape[0]), "tokens": float(batch["attention_mask"].sum())}


@torch.no_grad()
def evaluate_lm(engine, eval_loader) -> dict[str, float]:
    """Token-weighted loss and perplexity over the held-out set (summed over ranks)."""
    engine.eval()
    total, count = 0.0, 0.0
    for batch in eval_loader:
        batch = to_device(batch)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                reduction="sum")
        total += nll.item()
        count += float((labels != -100).sum())
    engine.train()
    total, count = all_sum([total, count])
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def run_sft(config: SFTConfig) -> dict:
    """Train step 1; save the consolidated HF folder at config.output_dir. Returns the final metrics."""
    config.validate()
    check_inputs(config)
    model = model_path(config)
    tokenizer = load_tokenizer(tokenizer_path(config, model))
    ds.init_distributed()
    seed_everything(config.seed)
    train_samples, held_samples = step_samples(config, "sft")
    train_set = SFTDataset(train_samples, tokenizer, config.max_seq_len, cache_dir(config), mask_prompt=config.mask_prompt)
    if len(train_set) == 0:
        raise ConfigError("data", f"no usable SFT samples in {config.data} (dropped: {dict(train_set.dropped)})")
    collate = CausalLMCollator(tokenizer.pad_token_id)
    train_loader = loader(train_set, collate, config.batch_size, shuffle=True, seed=config.seed)
    eval_loader = None
    if held_samples:
        eval_set = SFTDataset(held_samples, tokenizer, config.max_seq_len, cache_dir(config), mask_prompt=config.mask_prompt)
        eval_loader = loader(eval_set, collate, config.batch_size, shuffle=False, seed=config.seed)

    lm = apply_lora(load_causal_lm(model, ds.torch_dtype(config.deepspeed)), config.lora)
    enable_gradient_checkpointing(lm, config)
    engine = ds.init_engine(lm, config.deepspeed, batch_size=config.batch_size,
                            grad_accum=config.gradient_accumulation_steps, lr=config.learning_rate,
                            weight_decay=config.weight_decay, warmup_steps=config.warmup_steps)
    out_dir = Path(config.output_dir)
    result: dict = {"train_samples": len(train_set)}
    with MetricsLogger(out_dir) as metrics:
        if eval_loader is not None:
            before = evaluate_lm(engine, eval_loader)
            result["eval_loss_before"] = before["eval_loss"]
            metrics.log(0, **before)
            log.info("sft eval before: loss %.4f ppl %.2f", before["eval_loss"], before["eval_ppl"])
        trained = train(engine, train_loader, causal_lm_loss, config, metrics, "sft")
        result.update({k: v for k, v in trained.items() if k != "losses"})
        if eval_loader is not None:
            after = evaluate_lm(engine, eval_loader)
            result["eval_loss"] = after["eval_loss"]
            metrics.log(trained["steps"], **after)
            log.info("sft eval after: loss %.4f ppl %.2f", after["eval_loss"], after["eval_ppl"])
    result["checkpoint"] = str(checkpoint.save_hf(engine, tokenizer, out_dir))
    log.info("sft done: %s", {k: v for k, v in result.items()})
    return result
