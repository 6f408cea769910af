"""Incremental detokenization with multi-token stop strings.

Text is produced with the offset technique (as in TGI / vLLM): decode a small window of recent ids
twice, with and without the newest tokens, and emit the difference, so byte-fallback and BPE pieces
that only form a character together are held back until complete (no U+FFFD in the middle of a
stream) and the leading space of the first generated word is kept (the window starts in the prompt).

Stop strings may span several tokens. When the text contains one, generation stops with "stop" and
the text is cut before it. Text that might be the start of a stop string is held back, so a delta
never contains text that later turns out to belong to a stop string; the concatenation of all
deltas equals the final text.
"""

from __future__ import annotations

PROMPT_WINDOW = 5   # prompt tokens decoded with the first generated ones (for spacing)


def fast_decode(tokenizer):
    """`tokenizer.decode`, or the Rust tokenizer's own decode when that returns the same text (a fast
    tokenizer that does not clean up tokenization spaces): half the cost per call, twice per token."""
    raw = getattr(tokenizer, "_tokenizer", None)
    if raw is not None and hasattr(raw, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return raw.decode
    return tokenizer.decode


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self._decode_ids = fast_decode(tokenizer)
        self.ids = list(prompt_token_ids[-PROMPT_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""            # all decoded text so far (stop string cut off once found)
        self.emitted = 0          # characters of self.text already handed out
        self.stop = list(stop)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=True)

    def add_tokens(self, token_ids: list[int], check_stop: bool = True) -> None:
        """Feed newly generated tokens that belong in the text (not a final EOS/stop token).

        `check_stop=False` (below min_new_tokens) lets stop strings pass into the text.
        """
        if self.stopped or not token_ids:
            return
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return                # an incomplete character: wait for more tokens
        self._append(new_text[len(prefix_text):], check_stop)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        # keep the window short: later decodes only need the last few ids
        if self.prefix_offset > 64:
            drop = self.prefix_offset
            self.ids = self.ids[drop:]
            self.prefix_offset -= drop
            self.read_offset -= drop

    def _append(self, delta: str, check_stop: bool = True) -> None:
        # a new match must include new text, so search only the tail that could hold one
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += delta
        if not check_stop:
            return
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i != -1]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def flush(self) -> None:
        """The sequence ended: decode any held-back tail (even an incomplete character)."""
        if self.stopped or self.read_offset >= len(self.ids):
            return
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text):
            self._append(new_text[len(prefix_text):])
        self.prefix_offset = self.read_offset = len(self.ids)

    def take_delta(self, finished: bool) -> str:
        """Text safe to emit now; everything left when finished."""
        end = len(self.text) if (finished or self.stopped) else len(self.text) - self._held_back()
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held
