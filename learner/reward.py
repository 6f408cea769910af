"""Step 2: a pairwise reward model: a value head on a causal LM, loss -logsigmoid(r_chosen - r_rejected),
the score being the value at the last real token. Evaluation reports held-out accuracy and the mean
chosen / rejected scores before and after training."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from learner import checkpoint, ds
from learner.config import RewardConfig
from learner.data import PairCollator, PairDataset
from learner.ds import all_sum, loader, seed_everything, to_device
from learner.inputs import cache_dir, check_inputs, model_path, step_samples, tokenizer_path
from learner.metrics import MetricsLogger
from learner.modeling import ValueModel, apply_lora, enable_gradient_checkpointing, last_token_index, load_tokenizer
from learner.train_loop import train

log = logging.getLogger(__name__)


def pair_scores(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores [B] of a PairCollator batch (2B rows, chosen first)."""
    values = engine(batch["input_ids"], batch["attention_mask"])
    scores = values.gather(1, last_token_index(batch["attention_mask"])[:, None]).squeeze(1)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def pairwise_loss(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    chosen, rejected = pair_scores(engine, batch)
    loss = -F.logsigmoid(chosen - rejected).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    return loss, {"samples": float(chosen.shape[0]), "tokens": float(batch["attention_mask"].sum()),
                  "accuracy": float((chosen > rejected).float().mean()),
                  "chosen_score": float(chosen.mean()), "rejected_score": float(rejected.mean())}


@torch.no_grad()
def evaluate_pairs(engine, eval_loader) -> dict[str, float]:
    """Held-out accuracy (chosen scored above rejected), mean scores and loss, summed over ranks."""
    engine.eval()
    correct = count = chosen_sum = rejected_sum = loss_sum = 0.0
    for batch in eval_loader:
        chosen, rejected = pair_scores(engine, to_device(batch))
        correct += float((chosen > rejected).sum())
        count += chosen.shape[0]
        chosen_sum += float(chosen.sum())
        rejected_sum += float(rejected.sum())
        loss_sum += float(-F.logsigmoid(chosen - rejected).sum())
    engine.train()
    correct, count, chosen_sum, rejected_sum, loss_sum = all_sum([correct, count, chosen_sum, rejected_sum, loss_sum])
    n = max(count, 1.0)
    return {"eval_accuracy": correct / n, "eval_chosen_score": chosen_sum / n, "eval_rejected_score": rejected_sum / n,
            "eval_loss": loss_sum / n, "eval_pairs": count}


def _report(when: str, m: dict[str, float]) -> None:
    line = (f"reward model {when}: held-out accuracy {m['eval_accuracy']:.3f} over {int(m['eval_pairs'])} pairs, "
            f"mean chosen score {m['eval_chosen_score']:+.4f}, mean rejected score {m['eval_rejected_score']:+.4f}, "
            f"loss {m['eval_loss']:.4f}")
    if ds.rank() == 0:
        print(line, flush=True)


def run_reward(config: RewardConfig) -> dict:
    """Train step 2; save the value model (HF folder + value_head.safetensors) at config.output_dir."""
    config.validate()
    check_inputs(config)
    model = model_path(config)
    tokenizer = load_tokenizer(tokenizer_path(config, model))
    ds.init_distributed()
    seed_everything(config.seed)
    train_samples, held_samples = step_samples(config, "reward")
    train_set = PairDataset(train_samples, tokenizer, config.max_seq_len, cache_dir(config))
    if len(train_set) == 0:
        raise ConfigError("data", f"no preference pairs for the reward model in {config.data} "
                                  f"(dropped: {dict(train_set.dropped)})")
    collate = PairCollator(tokenizer.pad_token_id)
    train_loader = loader(train_set, collate, config.batch_size, shuffle=True, seed=config.seed)
    eval_loader = None
    if held_samples:
        eval_set = PairDataset(held_samples, tokenizer, config.max_seq_len, cache_dir(config))
        if len(eval_set):
            eval_loader = loader(eval_set, collate, config.batch_size, shuffle=False, seed=config.seed)

    value_model = apply_lora(ValueModel.from_pretrained(model, ds.torch_dtype(config.deepspeed)), config.lora)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    enable_gradient_checkpointing(value_model, config)
    engine = ds.init_engine(value_model, config.deepspeed, batch_size=config.batch_size,
                            grad_accum=config.gradient_accumulation_steps, lr=config.learning_rate,
                            weight_decay=config.weight_decay, warmup_steps=config.warmup_steps)
    out_dir = Path(config.output_dir)
    result: dict = {"train_pairs": len(train_set)}
    with MetricsLogger(out_dir) as metrics:
        if eval_loader is not None:
            before = evaluate_pairs(engine, eval_loader)
            metrics.log(0, **before)
            _report("before training", before)
            result["eval_accuracy_before"] = before["eval_accuracy"]
        trained = train(engine, train_loader, pairwise_loss, config, metrics, "reward")
        result.update({k: v for k, v in trained.items() if k != "losses"})
        if eval_loader is not None:
            after = evaluate_pairs(engine, eval_loader)
            metrics.log(trained["steps"], **after)
            _report("after training", after)
            result.update(after)
    result["checkpoint"] = str(checkpoint.save_hf(engine, tokenizer, out_dir, value_head=True))
    return result
