"""The supervised training loop shared by step 1 (SFT) and step 2 (reward model).

`loss_fn(engine, batch) -> (loss, stats)` computes one micro-batch; the loop does backward/step through
DeepSpeed (which handles gradient accumulation and clipping), logs every optimizer step (loss averaged
over ranks, learning rate, samples/s, tokens/s), saves resumable checkpoints, and resumes from them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common.errors import ConfigError
from common.progress import progress
from learner import checkpoint, ds
from learner.config import CommonConfig
from learner.ds import all_sum, to_device
from learner.metrics import MetricsLogger

log = logging.getLogger(__name__)

LossFn = Callable[[object, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def total_steps(config: CommonConfig, batches_per_epoch: int) -> int:
    steps = config.epochs * batches_per_epoch // config.gradient_accumulation_steps
    return min(steps, config.max_steps) if config.max_steps else steps


def train(engine, train_loader, loss_fn: LossFn, config: CommonConfig, metrics: MetricsLogger, desc: str) -> dict:
    """Run the epochs (or max_steps optimizer steps); returns {"steps", "first_loss", "last_loss", "losses"}."""
    ga = config.gradient_accumulation_steps
    steps = total_steps(config, len(train_loader))
    if steps < 1:
        raise ConfigError("gradient_accumulation_steps", f"{desc}: {len(train_loader)} batches per epoch and "
                                                         f"{ga} micro-batches per step give no optimizer step")
    resume_dir = Path(config.output_dir) / "resume"
    step, start_epoch, skip = 0, 0, 0
    position = {"step": 0, "epoch": 0, "batch": 0}  # where the next micro-batch comes from
    if config.resume:
        state = checkpoint.load_resumable_state(engine, resume_dir)
        if state:
            step, start_epoch, skip = state[1]["step"], state[1]["epoch"], state[1]["batch"]
            log.info("%s: resumed from %s at step %d", desc, resume_dir / state[0], step)
    micro = step * ga  # micro-batches done: DeepSpeed's accumulation boundary is every ga of them, across epochs
    losses: list[float] = []
    window_loss, window_stats, window_start = [], {}, time.perf_counter()
    bar = progress(total=steps, initial=step, desc=desc, disable=ds.rank() != 0, dynamic_ncols=True)
    engine.train()
    for epoch in range(start_epoch, config.epochs):
        train_loader.sampler.set_epoch(epoch)
        for batch_index, batch in enumerate(train_loader):
            if step >= steps:
                break
            if epoch == start_epoch and batch_index < skip:
                continue
            loss, stats = loss_fn(engine, to_device(batch))
            engine.backward(loss)
            engine.step()
            window_loss.append(loss.item())
            for k, v in stats.items():
                window_stats[k] = window_stats.get(k, 0.0) + v
            micro += 1
            if micro % ga:
                continue
            step += 1
            done_epoch = batch_index + 1 == len(train_loader)
            position = {"step": step, "epoch": epoch + done_epoch, "batch": 0 if done_epoch else batch_index + 1}
            elapsed = time.perf_counter() - window_start
            mean_loss, samples, tokens = all_sum([sum(window_loss) / len(window_loss),
                                                  window_stats.get("samples", 0.0), window_stats.get("tokens", 0.0)])
            mean_loss /= ds.world_size()
            losses.append(mean_loss)
            extra = {k: v / len(window_loss) for k, v in window_stats.items() if k not in ("samples", "tokens")}
            metrics.log(step, loss=mean_loss, lr=_lr(engine), samples_per_s=samples / elapsed,
                        tokens_per_s=tokens / elapsed, epoch=epoch, **extra)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if step % config.log_every == 0 or step == steps:
                log.info("%s step %d/%d loss %.4f", desc, step, steps, mean_loss)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"{desc}: loss is {mean_loss} at step {step}")
            if config.save_every and step % config.save_every == 0 and step < steps:
                checkpoint.save_resumable(engine, resume_dir, f"step{step}", position)
            window_loss, window_stats, window_start = [], {}, time.perf_counter()
    bar.close()
    if position["step"] == step and step > 0:
        checkpoint.save_resumable(engine, resume_dir, f"step{step}", position)
    return {"steps": step, "first_loss": losses[0] if losses else math.nan,
            "last_loss": losses[-1] if losses else math.nan, "losses": losses}


def _lr(engine) -> float:
    try:
        return float(engine.get_lr()[0])
    except (AttributeError, IndexError, TypeError):
        return math.nan
