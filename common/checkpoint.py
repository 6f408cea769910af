"""Read HF checkpoint tensors from a local folder: model.safetensors, sharded *.safetensors, or pytorch_model*.bin."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import ConfigError


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: a sharded index's files, else the single file; safetensors first.

    Other *.safetensors files beside them (a LoRA adapter, say) are not read."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [folder / single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    raise ConfigError("model", f"{folder} has no model.safetensors, *.safetensors shards or pytorch_model.bin")


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor in the checkpoint, one file at a time."""
    for path in checkpoint_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()
            del state
