"""Engine configuration: one dataclass, validated once at the edge (CLI or library call)."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULING_MODES = ("splitfuse", "separate")


@dataclass
class EngineConfig:
    model: str                        # local HF folder: config.json + safetensors/bin (+ tokenizer)
    tokenizer: str | None = None      # tokenizer folder when the model folder has none
    dtype: str = "auto"               # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"              # auto: cuda when available, else cpu
    token_budget: int = 256           # tokens per forward pass (decode tokens + prompt chunks)
    block_size: int = 16              # tokens per KV-cache block
    num_kv_blocks: int = 0            # 0: sized from kv_cache_fraction / a CPU default
    max_num_seqs: int = 128           # running sequences at most
    max_model_len: int = 0            # 0: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0                     # seeds requests that give no seed of their own
    scheduling: str = "splitfuse"     # splitfuse: decode + prompt chunks fused in every pass;
                                      # separate: prefill-only and decode-only passes (the ablation baseline)

    def validate(self) -> EngineConfig:
        if not self.model:
            raise ConfigError("model", "a local model folder is required")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ConfigError("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.scheduling not in SCHEDULING_MODES:
            raise ConfigError("scheduling", f"must be one of {', '.join(SCHEDULING_MODES)}, got {self.scheduling!r}")
        for name in ("token_budget", "block_size", "max_num_seqs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("num_kv_blocks", "max_model_len"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        return self
