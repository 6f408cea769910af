"""The embedded default model: a tiny Llama made and pre-trained by the project, cached on disk.

Pre-training text is the world's "internet": statements of every fact ("3 plus 4 is 7 .") and
dialogues written by careless demonstrators (often wrong, rude or rambling), so the model knows the
facts and the dialogue format but not which answers people prefer. The result is an HF folder
(config.json + model.safetensors + tokenizer) cached under $TANDEM_CACHE or ~/.cache/tandem, keyed by
MODEL_VERSION; building it takes well under a minute on 2 CPU cores and is done once.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.progress import progress
from learner.task.demos import Demonstrator
from learner.task.tokenizer import save_tokenizer
from learner.task.world import COLORS, OPPOSITES, SOUNDS, all_questions

log = logging.getLogger(__name__)

MODEL_VERSION = "v2"           # bump when the world, tokenizer, model shape or recipe changes
CARELESS = Demonstrator(wrong=0.5, polite=0.3, rude=0.3, ramble=0.5)
SEQ_LEN, BATCH, STEPS, LR = 64, 32, 800, 3e-3
FACT_REPEATS, DIALOGUES = 20, 2000


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("TANDEM_CACHE") or Path.home() / ".cache" / "tandem")


def default_model_path(cache_dir: str | None = None) -> Path:
    """The embedded default model's HF folder, pre-training it first when it is not cached yet."""
    out = cache_root(cache_dir) / f"embedded-model-{MODEL_VERSION}"
    if (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out.parent))
    try:
        build_model(tmp)
        try:
            tmp.rename(out)          # atomic: a concurrent builder may have won; then keep theirs
        except OSError:
            if not (out / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_config(vocab_size: int, pad: int, bos: int, eos: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       tie_word_embeddings=False, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)


def pretraining_texts(seed: int, n_dialogues: int = DIALOGUES) -> list[str]:
    """Documents of the world's "internet": fact statements (each several times) and careless dialogues."""
    rng = random.Random(seed)
    facts = [f"{q.text.removeprefix('what is ')} is {q.answer} ." for q in all_questions() if q.kind in ("plus", "minus")]
    facts += [f"a {k} says {v} ." for k, v in SOUNDS.items()] + [f"the {k} is {v} ." for k, v in COLORS.items()]
    facts += [f"the opposite of {k} is {v} ." for k, v in OPPOSITES.items()]
    questions = all_questions()
    docs = facts * FACT_REPEATS
    for _ in range(n_dialogues):
        q = rng.choice(questions)
        docs.append(q.prompt + CARELESS.write(q, rng))
    rng.shuffle(docs)
    return docs


def build_model(out_dir: Path, seed: int = 0) -> Path:
    """Make the tokenizer and the tiny Llama, pre-train it on `pretraining_texts`, save both to `out_dir`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)         # a 64-wide model gains nothing from more threads; they only contend
    try:
        return _pretrain(out_dir, seed)
    finally:
        torch.set_num_threads(threads)


def _pretrain(out_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    tok = save_tokenizer(out_dir)
    model = LlamaForCausalLM(model_config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id))
    stream: list[int] = []
    for doc in pretraining_texts(seed):
        stream += tok(doc)["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(stream[: len(stream) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = progress(range(STEPS), desc="pre-training the embedded model", unit="step")
    for step in bar:
        batch = data[torch.randint(len(data), (BATCH,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("pre-trained the embedded model: %d tokens, final loss %.3f", data.numel(), loss.item())
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    model.generation_config.save_pretrained(str(out_dir))
    return out_dir
