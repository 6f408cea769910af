"""DeepSpeed plumbing: process group, the config dict, engines (trainable or frozen), seeding, sharded
loaders and sums over ranks.

Everything here avoids DeepSpeed's hidden g++ compiles on CPU (see ENVIRONMENT.md): the shared-memory
comm op is switched off before `init_distributed`, and the optimizer is torch's AdamW
(`"torch_adam": true`), also under optimizer offload.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common.net import free_port
from learner.config import DeepSpeedOptions

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def init_distributed() -> None:
    """Join (or create) the process group; idempotent.

    Under the `deepspeed`/`torchrun` launchers the environment is already set. A plain single process gets
    RANK=0, WORLD_SIZE=1, LOCAL_RANK=0 and a free loopback port, so DeepSpeed does not look for MPI.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a 35-68 s g++ compile otherwise
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("LOCAL_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    log.debug("process group ready: rank %s of %s (%s)", rank(), world_size(), backend)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def device() -> torch.device:
    """The device this rank computes on (its GPU when there is one, else the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def fast_bf16() -> bool:
    """Whether this rank's device multiplies bf16 natively: a GPU that supports it, or a CPU where oneDNN has
    a bf16 path (AVX-512). On an AVX2-only CPU bf16 matmul is emulated, about 4x slower than fp32
    (benchmarks.ppo_step on a Zen 3: experience 1.77 s in bf16 vs 0.43 s in fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def frozen_dtype(name: str) -> torch.dtype:
    """The dtype of the frozen models for a `frozen_dtype` setting ("auto": bf16 where it is fast)."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16() else torch.float32
    return DTYPES[name]


def torch_dtype(opts: DeepSpeedOptions) -> torch.dtype:
    return DTYPES[opts.dtype]


def ds_config(opts: DeepSpeedOptions, batch_size: int, grad_accum: int, lr: float, weight_decay: float,
              *, warmup_steps: int = 0) -> dict:
    """The DeepSpeed config dict for a trainable engine (micro batch `batch_size` per rank)."""
    zero: dict = {"stage": opts.zero_stage}
    if opts.zero_stage == 3:
        # small models: keep tiny tensors whole instead of partitioning them (DeepSpeed-Chat's values)
        zero.update({"stage3_param_persistence_threshold": 1e4, "stage3_max_live_parameters": 3e7,
                     "stage3_prefetch_bucket_size": 3e7, **zero_plus_plus(opts)})
    if opts.offload_optimizer:
        if opts.zero_stage == 0:
            from common.errors import ConfigError
            raise ConfigError("offload_optimizer", "needs zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world_size(),
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay,
                                                  "betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": opts.gradient_clipping,
        "bf16": {"enabled": opts.dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if warmup_steps > 0:
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                              "warmup_num_steps": warmup_steps,
                                                              "warmup_type": "linear"}}
    return config


def zero_plus_plus(opts: DeepSpeedOptions) -> dict:
    """DeepSpeed's ZeRO++ keys for the options that are on (stage 3 only; see DeepSpeedOptions)."""
    keys = {}
    if opts.zero_quantized_weights:
        if not torch.cuda.is_available():
            from common.errors import ConfigError

            raise ConfigError("zero_quantized_weights", "needs a CUDA device: DeepSpeed 0.19.8's CPU backend has no "
                                                        "quantizer op (its qwZ kernels are CUDA ones)")
        keys["zero_quantized_weights"] = True
    if opts.zero_quantized_gradients:
        keys["zero_quantized_gradients"] = True
    if opts.zero_hpz_partition_size:
        keys["zero_hpz_partition_size"] = opts.zero_hpz_partition_size
    return keys


def frozen_config(opts: DeepSpeedOptions, batch_size: int, dtype: torch.dtype | None = None) -> dict:
    """Config for a frozen ZeRO-3 model (reference, reward, EMA): partitioned, no optimizer."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "train_batch_size": batch_size * world_size(),
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4, **zero_plus_plus(opts)},
        "bf16": {"enabled": (dtype or torch_dtype(opts)) == torch.bfloat16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def init_engine(model: nn.Module, opts: DeepSpeedOptions, *, batch_size: int, grad_accum: int, lr: float,
                weight_decay: float, trainable: Iterable[nn.Parameter] | None = None, warmup_steps: int = 0):
    """Wrap `model` in a training DeepSpeedEngine (torch AdamW; only `trainable` params, default all with grad)."""
    import deepspeed

    init_distributed()
    params = list(trainable) if trainable is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("init_engine: the model has no trainable parameters")
    config = ds_config(opts, batch_size, grad_accum, lr, weight_decay, warmup_steps=warmup_steps)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine


WHOLE_FROZEN_MAX_PARAMS = 300_000_000


def init_frozen(model: nn.Module, opts: DeepSpeedOptions, *, batch_size: int, dtype: torch.dtype | None = None,
                whole_max_params: int = WHOLE_FROZEN_MAX_PARAMS):
    """A frozen model in eval mode, in `dtype` (default the training dtype). Under ZeRO-3 a model above
    `whole_max_params` becomes an optimizer-less partitioned engine (as DeepSpeed-Chat does for its reference
    and reward models); a smaller one stays whole on every rank, so its forwards gather nothing (a copy per
    rank, the trade the actor's generation copy makes too). Otherwise the plain module on this rank's device."""
    import deepspeed

    init_distributed()
    model.requires_grad_(False)
    dtype = dtype or torch_dtype(opts)
    if opts.zero_stage != 3 or sum(p.numel() for p in model.parameters()) <= whole_max_params:
        return model.to(device=device(), dtype=dtype).eval()
    engine, *_ = deepspeed.initialize(model=model.to(dtype), config=frozen_config(opts, batch_size, dtype))
    engine.eval()
    return engine


def unwrap(engine_or_model) -> nn.Module:
    """The module inside a DeepSpeedEngine (or the module itself)."""
    return getattr(engine_or_model, "module", engine_or_model)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This rank's random states (python, numpy, torch, CUDA) as plain values and tensors, for a checkpoint."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what rng_state() returned: sampling then goes on as if never interrupted."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dev = device()
    return {k: v.to(dev) for k, v in batch.items()}


def loader(dataset: Dataset, collate, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
    """Batches of this rank's shard. Every rank gets the same number of batches (ZeRO-3 needs it)."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)
