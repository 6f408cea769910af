"""The model runner: one forward pass over a ragged batch of chunks, on a paged KV cache.

Ready API (used by the engine):
    runner = ModelRunner(EngineConfig(model=PATH).validate())
    runner.info                        # ModelInfo: architecture, layers, kv heads, head_dim, vocab, max_model_len,
                                       #            eos_token_ids, bos_token_id, dtype, device
    runner.tokenizer                   # a HF tokenizer, or None when the model folder / config.tokenizer has none
    runner.kv_cache_bytes_per_block(block_size) -> int
    runner.allocate_kv_cache(num_blocks, block_size)      # must precede run()
    runner.run(chunks: list[ScheduledChunk]) -> float32 logits [chunks with needs_logits, vocab], chunk order
    runner.load_weights(named_tensors)  # HF names; all-or-nothing (FieldError naming the tensor, nothing written)
    runner.hf_parameter_shapes() -> {HF name: shape}
Architectures: llama (incl. GQA, tied embeddings), opt, gpt2. Models keep HF parameter names
(`runner.model.parameter_table()`); `serving.models.load_model(path, dtype, device)` loads one without a
runner and `serving.models.random_init.save_random_checkpoint(path, arch, **hf_config)` makes test/benchmark
checkpoints. The forward itself lives in serving/models/<arch>.py over serving/layers/attention.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import ConfigError
from serving.batch import ScheduledChunk
from serving.engine.config import EngineConfig
from serving.layers.attention import AttentionMetadata
from serving.models import load_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelInfo:
    """What the engine needs to know about the loaded model."""

    architecture: str            # "llama" | "opt" | "gpt2"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int           # config.max_model_len or the model's max positions
    eos_token_ids: list[int]     # from config.json / generation_config.json
    bos_token_id: int | None
    dtype: torch.dtype
    device: torch.device


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """"auto" means cuda + bfloat16 when a GPU is present, else cpu + float32."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was requested but no CUDA device is available")
    device_name = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name)
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[config.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("dtype", "float16 is not supported on CPU; use float32 or bfloat16")
    return device, dtype


def _model_info(hf_config, model, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> ModelInfo:
    arch = hf_config.model_type
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    max_positions = hf_config.max_position_embeddings
    if config.max_model_len > max_positions:
        raise ConfigError("max_model_len", f"{config.max_model_len} exceeds the model's {max_positions} positions")
    return ModelInfo(arch, hf_config.num_hidden_layers, num_kv_heads, head_dim, hf_config.vocab_size,
                     config.max_model_len or max_positions, _eos_token_ids(config.model, hf_config),
                     getattr(hf_config, "bos_token_id", None), dtype, device)


def _eos_token_ids(folder: str, hf_config) -> list[int]:
    ids: list[int] = []
    sources = [getattr(hf_config, "eos_token_id", None)]
    if (Path(folder) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        sources.append(GenerationConfig.from_pretrained(folder, local_files_only=True).eos_token_id)
    for value in sources:
        for token in (value if isinstance(value, (list, tuple)) else [value]):
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def _load_tokenizer(config: EngineConfig):
    from transformers import AutoTokenizer

    folder = config.tokenizer or config.model
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        if config.tokenizer:
            raise ConfigError("tokenizer", f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        logger.warning("%s has no tokenizer: only token-id prompts can be served", folder)
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError("tokenizer" if config.tokenizer else "model", f"cannot load the tokenizer: {exc}") from exc


class ModelRunner:
    """Loads the model once and runs one ragged forward pass per scheduler step."""

    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        device, dtype = resolve_device_dtype(config)
        self.model, self.hf_config = load_model(config.model, dtype, device)
        self.info = _model_info(self.hf_config, self.model, config, device, dtype)
        self.tokenizer = _load_tokenizer(config)
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = 0
        logger.info("loaded %s (%s, %d layers) on %s as %s", config.model, self.info.architecture,
                    self.info.num_layers, device, dtype)

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        info = self.info
        element = torch.empty(0, dtype=info.dtype).element_size()
        return 2 * info.num_layers * block_size * info.num_kv_heads * info.head_dim * element

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Zeroed caches (stale slots must hold finite values: masked keys still enter the product)."""
        if num_blocks < 1 or block_size < 1:
            raise ConfigError("num_kv_blocks", f"need >= 1 blocks of >= 1 tokens, got {num_blocks} x {block_size}")
        info = self.info
        shape = (2, num_blocks, block_size, info.num_kv_heads, info.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=info.dtype, device=info.device) for _ in range(info.num_layers)]
        self.block_size = block_size

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """One forward pass; float32 logits at the last token of each chunk with needs_logits, in order."""
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache must be called before run")
        if not chunks:
            return torch.empty(0, self.info.vocab_size)
        device = self.info.device
        token_ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        for chunk in chunks:
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_pos, chunk.start_pos + chunk.num_tokens))
            if chunk.needs_logits:
                logit_rows.append(len(token_ids) - 1)
        if positions and max(positions) >= self.info.max_model_len:
            raise ValueError(f"position {max(positions)} exceeds max_model_len {self.info.max_model_len}")
        meta = AttentionMetadata.build(chunks, self.block_size, device, self.info.dtype, self.info.head_dim,
                                      self.info.num_kv_heads)
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        position_ids = torch.tensor(positions, dtype=torch.long, device=device)
        hidden = self.model(input_ids, position_ids, meta, self.kv_caches)
        if len(logit_rows) != len(token_ids):
            hidden = hidden[torch.tensor(logit_rows, dtype=torch.long, device=device)]
        return self.model.compute_logits(hidden).float()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights by HF name; every name, shape and dtype is checked before anything is written."""
        pairs = self.model.check_weights(list(named_tensors))
        self.model.write_weights(pairs)

    def hf_parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in self.model.parameter_table().items()}
