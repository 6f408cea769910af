"""MetricsLogger: scalars per step to <run_dir>/metrics.jsonl and to TensorBoard event files (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from learner.tb_writer import EventFileWriter

log = logging.getLogger(__name__)


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


class MetricsLogger:
    """`log(step, loss=..., reward=...)` appends one JSON line {"step", "time", **scalars} and one TensorBoard
    event. Non-finite values are written as null in JSON (and skipped for TensorBoard); other ranks write nothing."""

    def __init__(self, run_dir: str | Path, rank: int | None = None):
        self.run_dir = Path(run_dir)
        self.rank = _rank() if rank is None else rank
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self._tb = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            self._tb = EventFileWriter(self.run_dir / "tb")

    def log(self, step: int, **scalars: float) -> None:
        if self._file is None:
            return
        values = {k: float(v) for k, v in scalars.items() if v is not None}
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._tb.add_scalars(int(step), {k: v for k, v in values.items() if math.isfinite(v)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()
            self._file = self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
