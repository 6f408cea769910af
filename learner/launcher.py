"""The commands that run a Python module as the learner's ranks under the deepspeed launcher
(`deepspeed.launcher.runner`, which sets RANK/LOCAL_RANK/WORLD_SIZE and adds --local_rank=N)."""

from __future__ import annotations

import sys

from common.net import free_port


def deepspeed_command(module: str, args: list[str], ranks: int, master_port: int | None = None) -> list[str]:
    """argv for `python -m module *args` on `ranks` ranks under the launcher (a free master port unless given)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(master_port if master_port is not None else free_port()), "--module", module, *args]


def rank_command(module: str, args: list[str], ranks: int) -> list[str]:
    """Like deepspeed_command, but one rank runs as a plain process (no launcher in between)."""
    return [sys.executable, "-m", module, *args] if ranks == 1 else deepspeed_command(module, args, ranks)
