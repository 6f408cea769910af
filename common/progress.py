"""Progress bars that read well when piped: a tqdm bar on a terminal; in a log file, one plain line
every PIPED_INTERVAL_S seconds (and at the end) instead of a carriage-return redraw on every update.

    for step in progress(range(n), desc="ppo"): ...
    bar = progress(total=n, desc="sft"); bar.update(1); bar.set_postfix(loss=...)
"""

from __future__ import annotations

import sys

from tqdm import tqdm

PIPED_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each redraw into one newline-terminated line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), except that off a terminal it prints a periodic one-line progress."""
    stream = kwargs.pop("file", None) or sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs.setdefault("mininterval", PIPED_INTERVAL_S)
    kwargs.setdefault("maxinterval", max(PIPED_INTERVAL_S, kwargs["mininterval"]))
    return tqdm(iterable, file=_Lines(stream), ascii=True, ncols=100, **kwargs)
