"""What every learner step does before and around its training loop: resolve the model and tokenizer,
read and split the data, seed, shard batches across ranks, and average numbers over ranks."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from learner import ds
from learner.config import CommonConfig
from learner.data import hold_out, load_dataset, parse_spec, split_for_steps
from learner.data.sample import Sample
from common.errors import ConfigError

log = logging.getLogger(__name__)

STEP_INDEX = {"sft": 0, "reward": 1, "ppo": 2}


def check_inputs(config: CommonConfig, model_fields: tuple[str, ...] = ("model",)) -> None:
    """Fail fast, before any engine starts: model folders, tokenizer folder and dataset paths must exist."""
    for name in (*model_fields, "tokenizer"):
        path = getattr(config, name, "")
        if path and not (Path(path) / ("config.json" if name != "tokenizer" else "")).exists():
            what = "tokenizer folder" if name == "tokenizer" else "HF model folder (config.json)"
            raise ConfigError(name, f"no {what} at {path!r}")
    for spec in config.data:
        parse_spec(spec)
    for name in ("ptx_data", "sft_only_data"):
        for spec in getattr(config, name, []):
            try:
                parse_spec(spec)
            except ConfigError as e:
                raise ConfigError(name, e.message) from None


def model_path(config: CommonConfig, path: str = "") -> str:
    """`path`, else config.model, else the embedded default model (built and cached on first use)."""
    if path or config.model:
        return path or config.model
    from learner.task import default_model_path

    return str(default_model_path())


def tokenizer_path(config: CommonConfig, model: str) -> str:
    return config.tokenizer or model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_samples(config: CommonConfig, step: str) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out) samples of one step: all datasets read, cut by data_split, blended, then
    config.eval_fraction held out."""
    datasets = [load_dataset(spec, seed=config.seed) for spec in config.data]
    parts = split_for_steps(datasets, config.data_split, config.seed)
    samples = parts[STEP_INDEX[step]]
    if step == "sft" and getattr(config, "sft_only_data", None):  # not split: every record goes to step 1
        extra = [load_dataset(spec, seed=config.seed) for spec in config.sft_only_data]
        samples = samples + [s for d in extra for s in d.samples]
    if not samples:
        raise ConfigError("data_split", f"gives step {step!r} no samples ({config.data_split!r} over "
                                        f"{sum(len(d.samples) for d in datasets)} records)")
    train, held = hold_out(samples, config.eval_fraction, config.seed)
    log.info("%s data: %d train / %d held-out samples from %d dataset(s)", step, len(train), len(held), len(datasets))
    return train, held


def loader(dataset: Dataset, collate, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
    """Batches of this rank's shard. Every rank gets the same number of batches (ZeRO-3 needs it)."""
    sampler = DistributedSampler(dataset, num_replicas=ds.world_size(), rank=ds.rank(), shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and ds.world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dev = ds.device()
    return {k: v.to(dev) for k, v in batch.items()}


def enable_gradient_checkpointing(model: torch.nn.Module, config: CommonConfig) -> None:
    """HF gradient checkpointing on the model's transformer when config.gradient_checkpointing is set."""
    if not getattr(config, "gradient_checkpointing", False):
        return
    target = getattr(model, "backbone", model)  # a ValueModel's transformer
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def cache_dir(config: CommonConfig) -> str | None:
    return getattr(config, "cache_dir", "") or None
