"""Rollouts from the generation server (StreamExperience), overlapped with training, bounded staleness.

    source = RemoteRolloutSource("127.0.0.1:50051", max_staleness=1, upcoming=next_prompt_batch)
    rollouts = source.generate(prompt_ids, params)      # L1's RolloutSource protocol
    ...train on them...; push weights; source.learner_version = pushed_version

Overlap: as soon as batch k is handed to the trainer, batch k+1 (from `upcoming()`, or given to
`prefetch`) is submitted, so the server generates it while the learner trains on batch k. When the
learner later asks for batch k+1 the prompts are checked against the prefetched ones (a mismatch
cancels the prefetch and generates afresh). Each sample carries the weight version that made it;
its staleness is `learner_version - version`. Samples within `max_staleness` are kept (the trainer
corrects stale ones with truncated importance ratios, learner.rollout.staleness); samples beyond it are
dropped and generated again with the server's current weights. With max_staleness 0 nothing is
prefetched (strictly on-policy). The counts of each batch are in `last_stats`, totals in `totals`.

A server that goes away mid-call raises ServerLost (its stream is not retried here:
learner.rollout.server_link waits for the server and decides). After a restart, `server_restarted(old)`
drops the prefetched batch and retires the old process's instance id: its samples are never used again
(counted as `rollout_old_process`), even at the learner's version.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable

from clients.client import TandemClient
from clients.results import Experience, TandemError, build_rollout_request
from learner.rollout.local import Rollout, SamplingParams
from learner.rollout.reconnect import is_transient
from learner.rollout.staleness import split_by_staleness
from protos import tandem_pb2

log = logging.getLogger(__name__)

MAX_REGENERATIONS = 2


class RolloutError(RuntimeError):
    """The server refused or broke a rollout; the message carries its gRPC status."""


class ServerLost(RolloutError):
    """The rollout failed because the server went away (UNAVAILABLE, a passed deadline, a cut stream)."""


class TooStale(RolloutError):
    """Samples stayed beyond max_staleness after regenerating them (the server lacks the learner's weights)."""


def sampling_options(params: SamplingParams) -> dict:
    """The client SDK's sampling keywords for the learner's SamplingParams."""
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_new_tokens": params.max_new_tokens, "seed": params.seed, "min_new_tokens": params.min_new_tokens,
            "ignore_eos": params.ignore_eos, "logprobs_mode": params.logprobs_mode}


def request_for(prompts: list[list[int]], params: SamplingParams, samples_per_prompt: int = 1,
                rollout_id: str = "") -> tandem_pb2.RolloutRequest:
    """The RolloutRequest a RemoteRolloutSource sends for these prompts (tests send it by hand)."""
    return build_rollout_request([list(p) for p in prompts], sampling_options(params), samples_per_prompt,
                                 rollout_id or uuid.uuid4().hex)


def rollout_from_experience(e: Experience) -> Rollout:
    return Rollout(prompt_ids=e.prompt_token_ids, response_ids=e.response_token_ids,
                   logprobs=e.behaviour_logprobs, finish_reason=e.finish_reason or "length",
                   weight_version=e.weight_version, text=e.response_text,
                   meta={"rollout_id": e.rollout_id, "sample_index": e.sample_index, "instance_id": e.instance_id})


class RolloutJob:
    """One StreamExperience call, drained on a helper thread as the experiences arrive."""

    def __init__(self, client: TandemClient, prompts: list[list[int]], params: SamplingParams,
                 samples_per_prompt: int, timeout: float | None, sent: SamplingParams | None = None):
        self.prompts, self.params, self.samples = prompts, params, samples_per_prompt
        self.results: dict[tuple[int, int], Rollout] = {}
        self.error: BaseException | None = None
        self._call = client.stream_experience(prompts, samples_per_prompt=samples_per_prompt,
                                              rollout_id=uuid.uuid4().hex, timeout=timeout,
                                              **sampling_options(sent or params))   # `sent`: seeded params
        self._thread = threading.Thread(target=self._drain, name="rollout", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            for e in self._call:
                self.results[(e.prompt_index, e.sample_index)] = rollout_from_experience(e)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            self.error = err

    def matches(self, prompts: list[list[int]], params: SamplingParams, samples_per_prompt: int = 1) -> bool:
        return self.prompts == prompts and self.params == params and self.samples == samples_per_prompt

    def done(self) -> bool:
        """Whether the stream has ended (every sample in, or failed)."""
        return not self._thread.is_alive()

    def cancel(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=10)

    def result(self) -> list[Rollout]:
        """The rollouts, prompt-major (prompt 0's samples first); raises RolloutError on a failed call."""
        self._thread.join()
        if self.error is not None:
            err = self.error
            if is_transient(err):
                raise ServerLost(f"StreamExperience failed: {err.code.name}: {err.details}") from None
            if isinstance(err, TandemError):
                raise RolloutError(f"StreamExperience failed: {err.code.name}: {err.details}") from None
            raise RolloutError(f"StreamExperience failed: {err!r}") from err
        expected = len(self.prompts) * self.samples
        if len(self.results) != expected:
            raise RolloutError(f"StreamExperience ended after {len(self.results)} of {expected} samples")
        return [self.results[(p, s)] for p in range(len(self.prompts)) for s in range(self.samples)]


class RemoteRolloutSource:
    """L1's RolloutSource over a generation server; see the module docstring."""

    def __init__(self, server: str, *, max_staleness: int = 1, learner_version: int | None = None,
                 upcoming: Callable[[], list[list[int]]] | None = None, timeout: float | None = 600.0,
                 seed: int | None = None, credentials=None):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.server = server
        self.max_staleness = max_staleness
        self.upcoming = upcoming
        self.timeout = timeout
        self.seed = seed
        self.calls = 0                          # seeded calls made (each gets seed + calls)
        self._credentials = credentials
        self._client = TandemClient(server, credentials=credentials)   # TLS when credentials are given
        self.retired: set[str] = set()          # instance ids of server processes seen to restart
        self.learner_version = self.server_version() if learner_version is None else int(learner_version)
        self._pending: RolloutJob | None = None
        self.last_stats: dict[str, float] = {}
        self.totals: Counter = Counter()

    def server_version(self) -> int:
        try:
            return self._client.status(timeout=30).weight_version
        except TandemError as err:
            raise RolloutError(f"{self.server}: GetStatus failed: {err.code.name}: {err.details}") from None

    def server_restarted(self, old_instance: str) -> None:
        """The server behind the address restarted: nothing of `old_instance` is used from now on."""
        self.cancel_prefetch()
        if old_instance:
            self.retired.add(old_instance)

    def reopen(self) -> None:
        """A fresh channel (after an outage the old one may still be backing off from its failures)."""
        self.cancel_prefetch()
        self._client.close()
        self._client = TandemClient(self.server, credentials=self._credentials)

    def from_retired(self, rollouts: list[Rollout]) -> bool:
        return any(r.meta.get("instance_id") in self.retired for r in rollouts)

    def _old(self, rollouts: list[Rollout]) -> list[int]:
        return [i for i, r in enumerate(rollouts) if r.meta.get("instance_id") in self.retired]

    def _params(self, params: SamplingParams) -> SamplingParams:
        if params.seed is not None or self.seed is None:
            return params
        self.calls += 1
        return dataclasses.replace(params, seed=self.seed + self.calls)

    def _start(self, prompts: list[list[int]], params: SamplingParams, samples_per_prompt: int = 1) -> RolloutJob:
        return RolloutJob(self._client, [list(p) for p in prompts], params, samples_per_prompt, self.timeout,
                          sent=self._params(params))

    def prefetch(self, prompts: list[list[int]], params: SamplingParams, samples_per_prompt: int = 1) -> None:
        """Start generating the next batch now (it runs while the learner trains)."""
        self.cancel_prefetch()
        if self.max_staleness > 0 and prompts:
            self._pending = self._start(prompts, params, samples_per_prompt)

    def generating(self) -> bool:
        """Whether the server is still generating the prefetched batch."""
        return self._pending is not None and not self._pending.done()

    def cancel_prefetch(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def generate(self, prompts: list[list[int]], params: SamplingParams, samples_per_prompt: int = 1) -> list[Rollout]:
        """`samples_per_prompt` Rollouts per prompt (prompt-major; the server shares the prompt's KV blocks
        among them), each within the staleness bound; then prefetch the next batch."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        prompts = [list(p) for p in prompts]
        job, self._pending = self._pending, None
        if job is not None and not job.matches(prompts, params, samples_per_prompt):
            log.warning("remote rollout: the prefetched batch is not the one asked for; generating afresh")
            job.cancel()
            job = None
        prefetched = job is not None
        rollouts = (job or self._start(prompts, params, samples_per_prompt)).result()
        expanded = [p for p in prompts for _ in range(samples_per_prompt)]
        rollouts, stats = self._within_bound(expanded, params, rollouts)
        stats["rollout_prefetched"] = float(prefetched)
        self.last_stats = stats
        self.totals.update({k: v for k, v in stats.items() if k != "rollout_max_staleness"})
        if self.upcoming is not None and self.max_staleness > 0:
            next_prompts = self.upcoming()
            if next_prompts:
                self.prefetch(next_prompts, params, samples_per_prompt)
        return rollouts

    def _within_bound(self, prompts, params, rollouts: list[Rollout]) -> tuple[list[Rollout], dict[str, float]]:
        """Replace samples beyond max_staleness (or from a retired process) by fresh ones; the counts of the
        first pass."""
        split = split_by_staleness([r.weight_version for r in rollouts], self.learner_version, self.max_staleness,
                                   exclude=self._old(rollouts))
        stats = split.metrics()
        todo = split.drop
        for _ in range(MAX_REGENERATIONS):
            if not todo:
                break
            log.info("remote rollout: %d of %d samples beyond max_staleness %d (learner v%d) or from a restarted "
                     "server: generating again",
                     len(todo), len(rollouts), self.max_staleness, self.learner_version)
            again = self._start([prompts[i] for i in todo], params).result()
            for i, r in zip(todo, again):
                rollouts[i] = r
            redo = split_by_staleness([r.weight_version for r in again], self.learner_version, self.max_staleness,
                                      exclude=self._old(again))
            todo = [todo[i] for i in redo.drop]
        if todo:
            raise TooStale(f"the server at {self.server} serves weight version {self.server_version()} but the "
                           f"learner is at v{self.learner_version}: samples stay beyond max_staleness "
                           f"{self.max_staleness} (are the learner's weights being pushed?)")
        if split.stale:
            log.debug("remote rollout: %d stale samples kept (lag <= %d), %d fresh", split.stale,
                     self.max_staleness, split.fresh)
        return rollouts, stats

    def rollout(self, prompts: list[list[int]], params: SamplingParams, samples_per_prompt: int) -> list[Rollout]:
        """`samples_per_prompt` samples of every prompt (prompt-major), synchronously, no staleness check."""
        return self._start(prompts, params, samples_per_prompt).result()

    def close(self) -> None:
        self.cancel_prefetch()
        self._client.close()

    def __enter__(self) -> RemoteRolloutSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
