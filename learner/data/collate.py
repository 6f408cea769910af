"""Collators: right padding for training batches, LEFT padding for prompts (so generation appends)."""

from __future__ import annotations

import torch


def pad(seqs: list[torch.Tensor], value: int, left: bool = False) -> torch.Tensor:
    """Stack 1-D tensors into [B, max_len], padding on the right (or the left) with `value`."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for row, s in enumerate(seqs):
        if left:
            out[row, width - len(s):] = s
        else:
            out[row, :len(s)] = s
    return out


def mask_of(seqs: list[torch.Tensor], left: bool = False) -> torch.Tensor:
    return pad([torch.ones(len(s), dtype=torch.long) for s in seqs], 0, left)


class CausalLMCollator:
    """SFT / ptx items -> input_ids, attention_mask, labels (-100 on padding), right padded."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = [it["input_ids"] for it in items]
        return {"input_ids": pad(ids, self.pad_id), "attention_mask": mask_of(ids),
                "labels": pad([it["labels"] for it in items], -100)}


class PairCollator:
    """Pair items -> one batch of 2B rows, the B chosen first then the B rejected (DeepSpeed-Chat's layout)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        seqs = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
        return {"input_ids": pad(seqs, self.pad_id), "attention_mask": mask_of(seqs)}


class PromptCollator:
    """Prompt items -> left-padded input_ids and attention_mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = [it["input_ids"] for it in items]
        return {"input_ids": pad(ids, self.pad_id, left=True), "attention_mask": mask_of(ids, left=True)}
