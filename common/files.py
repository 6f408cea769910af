"""Files that hold secrets: created readable by their owner only, from the first byte."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: str | Path, text: str) -> Path:
    """Write `text` to `path` with mode 0600 from creation (never briefly world-readable, as write_text then
    chmod would be); an existing file is truncated and set to 0600 first."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)            # an existing file keeps its old mode through O_CREAT
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    return path
