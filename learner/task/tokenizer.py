"""The embedded task's tokenizer: word level over the world's vocabulary, a real HF fast tokenizer."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from learner.task.world import vocabulary


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace split; unknown words map to <unk>); no BOS/EOS added on encode."""
    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", padding_side="left",
                                   model_max_length=128, clean_up_tokenization_spaces=False)


def save_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer and save it (tokenizer.json + configs) so AutoTokenizer loads it offline."""
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
