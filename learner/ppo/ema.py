"""An exponential moving average of the actor (DeepSpeed-Chat's actor_ema), saved as its own checkpoint.

The copy is a frozen engine (partitioned like the actor under ZeRO-3). Each update gathers one parameter
of each model at a time, never the whole model. `state_dict()` gathers the copy onto rank 0 for a resumable
checkpoint (learner.ppo.step keeps it with the actor's DeepSpeed checkpoint), `load_state_dict()` spreads it
back, so a resumed EMA goes on from where it was, not from the actor it was restarted with.
"""

from __future__ import annotations

import torch
from torch import nn

from learner import ds


class ActorEMA:
    """ema <- decay * ema + (1 - decay) * actor, parameter by parameter."""

    def __init__(self, ema_engine, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.engine, self.decay, self.updates = ema_engine, decay, 0

    @property
    def module(self) -> nn.Module:
        return ds.unwrap(self.engine)

    @torch.no_grad()
    def update(self, actor, decay: float | None = None) -> None:
        """One EMA step (decay=0 copies the actor)."""
        import deepspeed

        decay = self.decay if decay is None else decay
        actor_params = list(ds.unwrap(actor).parameters())
        ema_params = list(self.module.parameters())
        if len(actor_params) != len(ema_params):
            raise RuntimeError("the EMA copy and the actor have different parameters")
        for param, ema_param in zip(actor_params, ema_params):
            with deepspeed.zero.GatheredParameters([param, ema_param], modifier_rank=0):
                ema_param.data.copy_(torch.lerp(param.data.to(ema_param.dtype), ema_param.data, decay))
        self.updates += int(decay > 0)

    @torch.no_grad()
    def state_dict(self) -> dict:
        """The whole copy, on rank 0 (gathered one parameter at a time; collective, other ranks get no tensors)."""
        import deepspeed

        keep = ds.rank() == 0
        params = {}
        for name, param in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if keep:
                    params[name] = param.data.detach().cpu().clone()
        return {"decay": self.decay, "updates": self.updates, "params": params}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Put a state_dict() back (collective; rank 0's tensors are the ones written)."""
        import deepspeed

        saved = state["params"]
        names = [name for name, _ in self.module.named_parameters()]
        if ds.rank() == 0 and set(saved) != set(names):
            raise RuntimeError(f"the saved EMA copy has other parameters than this one: missing "
                               f"{sorted(set(names) - set(saved))[:3]}, unexpected {sorted(set(saved) - set(names))[:3]}")
        for name, param in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if ds.rank() == 0:
                    param.data.copy_(saved[name].to(param.device, param.dtype))
        self.updates = int(state["updates"])
