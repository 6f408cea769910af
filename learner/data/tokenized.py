"""Tokenized torch Datasets for the steps, with a deterministic on-disk cache of the tokenized result.

The cache key hashes the samples, the tokenizer (its full definition and how it encodes a probe), the
dataset kind and its lengths, so a change to any of them re-tokenizes. A cache file is written
atomically, so several ranks may build it at once. Records that cannot be used after tokenization are
counted per reason in `.dropped`, never silently lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from learner.data.sample import Sample

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
PROBE = "Hello world!\n\nHuman: 2+2?\n\nAssistant: 4"


def default_cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem")) / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes the ids it produces."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(str(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, tokenizer(PROBE).input_ids]).encode())
    return h.hexdigest()


def samples_fingerprint(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.prompt, s.chosen, s.rejected]).encode())
    return h.hexdigest()


def truncate_pair(prompt: list[int], response: list[int], max_len: int, bos: int | None
                  ) -> tuple[list[int], list[int]]:
    """Fit prompt + response into max_len: keep at least half for the response, cut the prompt from the
    left (keeping its BOS), cut the response from the right."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    keep_response = min(len(response), max(max_len // 2, max_len - len(prompt)))
    room = max_len - keep_response
    if room <= 0:
        return [], response[:max_len]
    if bos is not None and prompt and prompt[0] == bos and len(prompt) > room:
        prompt = [bos] + prompt[len(prompt) - room + 1:] if room > 1 else [bos]
    else:
        prompt = prompt[len(prompt) - room:]
    return prompt, response[:keep_response]


class TokenizedDataset(Dataset):
    """Base: subclasses define `columns` and `encode(sample) -> dict[column, ids] | reason`."""

    kind = "base"
    columns: tuple[str, ...] = ()

    def __init__(self, samples: list[Sample], tokenizer, max_len: int, cache_dir: str | Path | None = None,
                 **params):
        self.tokenizer, self.max_len, self.params = tokenizer, max_len, params
        self.samples = samples
        key = hashlib.sha256(json.dumps([CACHE_VERSION, self.kind, max_len, params, tokenizer_fingerprint(tokenizer),
                                         samples_fingerprint(samples)], sort_keys=True).encode()).hexdigest()[:24]
        self.cache_path = Path(cache_dir or default_cache_dir()) / f"{self.kind}-{key}.npz"
        self.from_cache = self.cache_path.exists()
        if self.from_cache:
            self._load()
        else:
            self._build()
            self._save()
        if self.dropped:
            log.warning("%s: dropped %s of %d samples", self.kind, dict(self.dropped), len(samples))

    # -- building and caching
    def encode(self, sample: Sample) -> dict[str, list[int]] | str:
        raise NotImplementedError

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def _eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]

    def _build(self) -> None:
        rows: dict[str, list[list[int]]] = {c: [] for c in self.columns}
        index, dropped = [], Counter()
        for i, sample in enumerate(self.samples):
            encoded = self.encode(sample)
            if isinstance(encoded, str):
                dropped[encoded] += 1
                continue
            index.append(i)
            for c in self.columns:
                rows[c].append(encoded[c])
        self.dropped = dropped
        self.index = np.asarray(index, dtype=np.int64)
        self.flat, self.offsets = {}, {}
        for c in self.columns:
            lengths = np.asarray([len(r) for r in rows[c]], dtype=np.int64)
            self.offsets[c] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self.flat[c] = np.asarray([t for r in rows[c] for t in r], dtype=np.int64)

    def _save(self) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"index": self.index, "dropped": np.frombuffer(json.dumps(dict(self.dropped)).encode(), np.uint8)}
        for c in self.columns:
            arrays[f"{c}.flat"], arrays[f"{c}.offsets"] = self.flat[c], self.offsets[c]
        fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, suffix=".tmp.npz")
        os.close(fd)
        np.savez(tmp, **arrays)
        os.replace(tmp, self.cache_path)

    def _load(self) -> None:
        with np.load(self.cache_path) as z:
            self.index = z["index"]
            self.dropped = Counter(json.loads(z["dropped"].tobytes().decode()))
            self.flat = {c: z[f"{c}.flat"] for c in self.columns}
            self.offsets = {c: z[f"{c}.offsets"] for c in self.columns}

    # -- the Dataset protocol
    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for c in self.columns:
            start, end = self.offsets[c][i], self.offsets[c][i + 1]
            out[c] = torch.from_numpy(self.flat[c][start:end].copy())
        return out

    def sample(self, i: int) -> Sample:
        """The Sample item i came from."""
        return self.samples[int(self.index[i])]


class SFTDataset(TokenizedDataset):
    """prompt + chosen + EOS; labels are -100 on the prompt when mask_prompt."""

    kind, columns = "sft", ("input_ids", "labels")

    def __init__(self, samples, tokenizer, max_len, cache_dir=None, mask_prompt: bool = True):
        super().__init__(samples, tokenizer, max_len, cache_dir, mask_prompt=mask_prompt)

    def encode(self, sample):
        if not sample.chosen:
            return "no response"
        prompt, response = truncate_pair(self._ids(sample.prompt, True), self._ids(sample.chosen, False) + self._eos(),
                                         self.max_len, self.tokenizer.bos_token_id)
        labels = ([-100] * len(prompt) if self.params["mask_prompt"] else prompt) + response
        return {"input_ids": prompt + response, "labels": labels}


class PairDataset(TokenizedDataset):
    """(prompt + chosen + EOS, prompt + rejected + EOS) sharing the same, possibly truncated, prompt."""

    kind, columns = "pair", ("chosen_ids", "rejected_ids")

    def encode(self, sample):
        if not sample.chosen or not sample.rejected:
            return "no rejected response" if sample.chosen else "no response"
        prompt = self._ids(sample.prompt, True)
        chosen = self._ids(sample.chosen, False) + self._eos()
        rejected = self._ids(sample.rejected, False) + self._eos()
        longer = chosen if len(chosen) >= len(rejected) else rejected
        prompt, kept = truncate_pair(prompt, longer, self.max_len, self.tokenizer.bos_token_id)
        chosen, rejected = chosen[:len(kept)], rejected[:len(kept)]
        if chosen == rejected:
            return "chosen equals rejected after truncation"
        return {"chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected}


class PromptDataset(TokenizedDataset):
    """Prompt ids alone (for PPO rollouts), cut from the left to max_len."""

    kind, columns = "prompt", ("input_ids",)

    def encode(self, sample):
        ids = self._ids(sample.prompt, True)
        if not ids:
            return "empty prompt"
        bos = self.tokenizer.bos_token_id
        if len(ids) > self.max_len:
            ids = ([bos] + ids[len(ids) - self.max_len + 1:]) if bos is not None and ids[0] == bos else ids[-self.max_len:]
        return {"input_ids": ids}


class TextDataset(TokenizedDataset):
    """Plain text + EOS (the ptx loss): labels are the inputs."""

    kind, columns = "text", ("input_ids", "labels")

    def encode(self, sample):
        text = sample.prompt + (sample.chosen or "")
        ids = (self._ids(text, True) + self._eos())[: self.max_len]
        if len(ids) < 2:
            return "too short"
        return {"input_ids": ids, "labels": ids}
