"""Pushing the actor's weights to the generation server after a PPO iteration (weight sync, learner side).

Under ZeRO-3 no rank ever holds the whole model: the parameters are gathered one module at a time
(learner.checkpoint.iter_gathered; a LoRA layer with its adapters, fused into the base weight), rank 0 streams
each to the server as it comes (clients.weight_push.StreamingPush copies it to the CPU and sends it on a
helper thread), and the gather is released before the next one. Every rank walks the same parameters (the
gathers are collective); only rank 0 talks to the server. Versions are counted on every rank alike, so all
ranks know the learner's version without a message. When to push, and what to do when a push fails, is
learner.rollout.server_link's business."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from clients.weight_push import PushReport, StreamingPush
from learner import ds
from learner.checkpoint import iter_gathered

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def actor_tensors(model: nn.Module, keep: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of every parameter, gathered one module at a time (collective: every rank must
    iterate to the end). Tied parameters come once, under their first name; LoRA comes fused.
    With keep=False (ranks other than 0) nothing is yielded but the gathers still happen."""
    for name, tensor in iter_gathered(ds.unwrap(model), keep=keep, buffers=False):
        yield name.removeprefix(PEFT_PREFIX), tensor


PUSH_DEADLINE_S = 600.0   # a push (stream + the server's swap) that takes longer fails with DEADLINE_EXCEEDED


def push_actor(actor, server: str, token: str | None, version: int, *, origin: str,
               encoding: str = "float32", timeout: float | None = PUSH_DEADLINE_S,
               credentials=None) -> PushReport | None:
    """Push `actor` as `version` within `timeout` s; rank 0 returns the server's report, other ranks None.

    A push the server refuses or breaks off raises on rank 0 only, and only after rank 0 has walked every
    parameter with the others (the gathers are collectives: leaving early would hang the other ranks);
    learner.rollout.server_link shares the outcome with every rank."""
    keep = ds.rank() == 0
    push = StreamingPush(server, token=token, version=version, origin=origin, encoding=encoding,
                         timeout=timeout, credentials=credentials) if keep else None
    failure: BaseException | None = None
    try:
        for name, tensor in actor_tensors(actor, keep=keep):
            if push is not None and failure is None:
                try:
                    push.send(name, tensor)
                except Exception as err:  # noqa: BLE001 - raised once every rank has walked the parameters
                    failure = err
        if failure is not None:
            raise failure
        report = push.commit() if keep else None
    except BaseException:
        if push is not None:
            push.abort()
        raise
    if report is not None:
        log.debug("pushed v%d (%s): %d tensors, %.2f MB %s in %.2f s (swap %.1f ms)", report.version, origin,
                 report.tensors, report.bytes_sent / 2**20, encoding, report.push_s, report.swap_s * 1e3)
    return report
