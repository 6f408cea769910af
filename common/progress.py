"""Progress bars that read well when piped: a tqdm bar on a terminal; in a log file, one plain line
every PIPED_INTERVAL_S seconds (and at the end) instead of a carriage-return redraw on every update.

    for step in progress(range(n), desc="ppo"): ...
    bar = progress(total=n, desc="sft"); bar.update(1); bar.set_postfix(loss=...)
"""

from __future__ import annotations

import os
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


class _PipedBar(tqdm):
    """Off a terminal a postfix or description change waits for the next periodic line (no extra redraw)."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=False):
        super().set_description(desc, refresh=False)


def is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def quiet_piped_bars() -> None:
    """Off a terminal, switch off the progress bars of the libraries below us (transformers' "Loading
    weights" bar): set before they are imported, and inherited by child processes."""
    if not is_terminal(sys.stderr):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), except that off a terminal it prints a periodic one-line progress."""
    stream = kwargs.pop("file", None) or sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs.setdefault("mininterval", PIPED_INTERVAL_S)
    kwargs.setdefault("maxinterval", max(PIPED_INTERVAL_S, kwargs["mininterval"]))
    return _PipedBar(iterable, file=_Lines(stream), ascii=True, ncols=100, **kwargs)
