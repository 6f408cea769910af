"""Shared fixtures: the real data in ../shared/data (tests skip with a reason when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TANDEM_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared(rel: str) -> Path:
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"fixture {path} is absent (set TANDEM_SHARED_DATA or put ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _shared("")


@pytest.fixture(scope="session")
def tinystories_path() -> Path:
    """A real pretrained LlamaForCausalLM (656K params, GQA, tied embeddings) with its tokenizer."""
    return _shared("models/tinystories-656k")


@pytest.fixture(scope="session")
def gpt2_tokenizer_path() -> Path:
    return _shared("tokenizers/gpt2")


@pytest.fixture(scope="session")
def hh_rlhf_path() -> Path:
    return _shared("hh-rlhf")


@pytest.fixture(scope="session")
def alpaca_path() -> Path:
    return _shared("alpaca/alpaca_5000.jsonl.gz")
