"""Checkpoints: consolidated HF folders (for serving and the next step) and resumable DeepSpeed ones.

`save_hf` never materialises the whole model on one rank under ZeRO-3: it walks the modules and gathers
one module's own parameters at a time (a LoRA layer together with its adapters, which are fused into the
base weight on the way out), copies them to CPU on rank 0, and releases them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from learner import ds
from learner.modeling import VALUE_HEAD_FILE, ValueModel, is_lora_layer

log = logging.getLogger(__name__)


def _gathered(params: list[nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _lora_merged_weight(module: nn.Module) -> torch.Tensor:
    """The base weight plus every active adapter's delta (call with the module's params gathered)."""
    weight = module.get_base_layer().weight.detach().clone()
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight += module.get_delta_weight(adapter).to(weight.dtype)
    return weight


def iter_gathered(model: nn.Module, keep: bool = True, buffers: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, full CPU tensor) for every parameter (and, with `buffers`, persistent buffer) of `model`, LoRA
    fused, gathered one module at a time under ZeRO-3 (for streaming a weight push or writing a checkpoint).

    Every rank must drive the iterator to the end (the gathers are collectives); with keep=False a rank
    gathers but yields nothing.
    """
    seen: set[int] = set()  # tied parameters are yielded once, under their first name

    def visit(prefix: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        if is_lora_layer(module):
            params = list(module.parameters())
            with _gathered(params):
                out = []
                if keep:
                    out.append((prefix + "weight", _lora_merged_weight(module).cpu()))
                    bias = module.get_base_layer().bias
                    if bias is not None:
                        out.append((prefix + "bias", bias.detach().cpu().clone()))
            seen.update(id(p) for p in params)
            yield from out
            return
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if own:
            with _gathered([p for _, p in own]):
                out = [(prefix + n, p.detach().cpu().clone()) for n, p in own] if keep else []
            seen.update(id(p) for _, p in own)
            yield from out
        if keep and buffers:
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and name not in module._non_persistent_buffers_set:
                    yield prefix + name, buf.detach().cpu().clone()
        for child_name, child in module.named_children():
            yield from visit(f"{prefix}{child_name}.", child)

    yield from visit("", model)


def gather_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The whole of iter_gathered as a dict (every rank must call it; only ranks with keep=True get tensors)."""
    return dict(iter_gathered(model, keep))


def _write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def save_hf(engine_or_model, tokenizer, out_dir: str | Path, *, value_head: bool = False) -> Path:
    """Write a consolidated HF folder (config.json, model.safetensors, tokenizer files) on rank 0.

    For a ValueModel (or value_head=True) the folder holds its backbone plus value_head.safetensors;
    `ValueModel.from_pretrained` loads it back. Every rank must call this (parameters are gathered).
    """
    module = ds.unwrap(engine_or_model)
    out = Path(out_dir)
    is_value = isinstance(module, ValueModel)
    if value_head and not is_value:
        raise TypeError("save_hf(value_head=True) needs a ValueModel")
    hf_model = module.backbone if is_value else module
    keep = ds.rank() == 0
    state = gather_state_dict(hf_model, keep=keep)
    head = gather_state_dict(module.v_head, keep=keep) if is_value else {}
    if keep:
        out.mkdir(parents=True, exist_ok=True)
        config = hf_model.config
        dtype = next(iter(state.values())).dtype if state else torch.float32
        config.dtype = dtype
        config.save_pretrained(str(out))
        generation_config = getattr(hf_model, "generation_config", None)
        if generation_config is not None and not is_value:
            generation_config.save_pretrained(str(out))
        _write_safetensors(state, out / "model.safetensors")
        if is_value:
            _write_safetensors(head, out / VALUE_HEAD_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        log.info("saved %s (%d tensors, %.1f MB)", out, len(state), nbytes / 2**20)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out


def save_resumable(engine, out_dir: str | Path, tag: str, client_state: dict | None = None) -> Path:
    """A DeepSpeed checkpoint (partitioned weights, optimizer, scheduler) under out_dir/tag."""
    out = Path(out_dir)
    engine.save_checkpoint(str(out), tag=tag, client_state=client_state or {})
    return out / tag


def load_resumable(engine, out_dir: str | Path) -> str | None:
    """Load the latest DeepSpeed checkpoint in out_dir into engine; its tag, or None when there is none."""
    out = Path(out_dir)
    if not (out / "latest").is_file():
        return None
    path, _client_state = engine.load_checkpoint(str(out))
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {out}")
    return (out / "latest").read_text().strip()


def rank_state_path(out_dir: str | Path, tag: str) -> Path:
    return Path(out_dir) / tag / f"rank{ds.rank()}.pt"


def save_rank_state(out_dir: str | Path, tag: str, state: dict) -> Path:
    """What only this rank knows (its random states, ...) under out_dir/tag/rank<r>.pt; a DeepSpeed checkpoint's
    client_state is rank 0's alone."""
    path = rank_state_path(out_dir, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_rank_state(out_dir: str | Path, tag: str) -> dict | None:
    """This rank's save_rank_state(out_dir, tag), or None when there is none."""
    path = rank_state_path(out_dir, tag)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def load_resumable_state(engine, out_dir: str | Path) -> tuple[str, dict] | None:
    """Like load_resumable, also returning the client_state saved with it."""
    out = Path(out_dir)
    if not (out / "latest").is_file():
        return None
    path, client_state = engine.load_checkpoint(str(out))
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {out}")
    return (out / "latest").read_text().strip(), client_state or {}
