"""The one remote-PPO wiring: PPO's rollouts from a generation server, the actor pushed back to it.

    link = ServerLink.open(config, actor, upcoming)   # pushes the starting actor when push_weights
    rollouts = link.generate(prompts, params)         # overlapped, bounded staleness, survives restarts
    link.after_iteration(iteration, models, stats)    # pushes the actor, advances the learner's version

run_ppo builds it whenever `rollout = remote`, so `tandem learn ppo --rollout remote --server HOST:PORT`,
`tandem up` and `benchmarks.rlhf` all go through here. With `push_weights` the actor PPO starts from (or
resumes from) is pushed before the first rollout, at a version above anything the server has served (a
fresh server, or one serving another model or older weights, then serves exactly the policy being
trained), and again after every iteration; without it the server's weights stay as they are and every
sample is counted at the server's version.

Surviving the server (the policy is in learner.rollout.reconnect): every call has a deadline
(config.rpc_timeout_s; status queries a short one). Before each rollout batch the link asks the server for
its status. When the server is gone, or a rollout stream or a push breaks, the link waits for it with
bounded back-off and raises ServerDown after config.server_down_limit_s. When it comes back as another
process (a new instance id) or without the learner's weights (a lower version), that is a restart: the
prefetched batch and every sample of the old process are dropped, the current actor is pushed again at
the learner's version (the restarted server starts lower, so it accepts it), and PPO goes on. Restarts are
counted in the result ("server_restarts"), and the samples trained on by the process that made them
("rollout_instances"). Every decision is taken on all ranks together: a push is collective (every rank
gathers, rank 0 sends), so a failure on rank 0 is shared before anyone retries.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

from clients.results import TandemError
from clients.weight_push import PushReport
from learner import ds
from learner.config import PUSH_ENCODINGS, PPOConfig
from learner.rollout.local import Rollout, SamplingParams
from learner.rollout.push import push_actor
from learner.rollout.reconnect import STATUS_TIMEOUT_S, ServerState, ServerWatch, is_transient
from learner.rollout.remote import RemoteRolloutSource, ServerLost, TooStale
from protos.auth import channel_credentials, read_token

log = logging.getLogger(__name__)


def shared_int(value: int) -> int:
    """Rank 0's value on every rank."""
    return int(ds.all_sum([float(value) if ds.rank() == 0 else 0.0])[0])


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any."""
    return ds.all_sum([float(bool(flag))])[0] > 0


class ServerLink:
    def __init__(self, config: PPOConfig, actor, source: RemoteRolloutSource, watch: ServerWatch,
                 token: str | None, credentials):
        self.config, self.actor, self.source, self.watch = config, actor, source, watch
        self.token, self.credentials = token, credentials
        self.pushing = config.push_weights
        self.encoding = PUSH_ENCODINGS[config.push_quantize]
        self.first_version = 0
        self.pushes: list[dict] = []
        self.restarts = 0
        self.used: Counter = Counter()          # samples trained on, by the server process that made them

    @classmethod
    def open(cls, config: PPOConfig, actor, upcoming: Callable[[], list[list[int]]] | None,
             start_iteration: int = 0) -> ServerLink:
        """Wait for the server (at most server_down_limit_s) and, with push_weights, push `actor` to it."""
        tls = None
        if config.server_tls_ca or config.server_tls_cert:
            tls = channel_credentials(config.server_tls_ca or None, config.server_tls_cert or None,
                                      config.server_tls_key or None)
        token = read_token(config.push_token_file or None) if config.push_weights else None
        watch = ServerWatch(config.server, down_limit_s=config.server_down_limit_s, credentials=tls,
                            status_timeout_s=min(STATUS_TIMEOUT_S, config.rpc_timeout_s))
        source = RemoteRolloutSource(config.server, max_staleness=config.max_staleness, learner_version=0,
                                     upcoming=upcoming, timeout=config.rpc_timeout_s,
                                     seed=config.seed * 7919 + ds.rank(), credentials=tls)
        link = cls(config, actor, source, watch, token, tls)
        state = link._reconnect()
        if link.pushing:
            first = shared_int(state.version + 1)
            origin = (f"{config.actor_model} (PPO start)" if start_iteration == 0 else
                      f"{config.output_dir}: resumed at ppo iteration {start_iteration}")
            link._push(actor, first, origin)
        else:
            first = shared_int(state.version)
        source.learner_version = link.first_version = first
        log.info("ppo: rollouts from %s (learner v%d, max staleness %d, pushes %s)", config.server, first,
                 config.max_staleness, link.encoding if link.pushing else "off")
        return link

    # ---------------------------------------------------------------- rollouts
    def generate(self, prompts: list[list[int]], params: SamplingParams, samples_per_prompt: int = 1) -> list[Rollout]:
        """The source's rollouts of these prompts, once the server is known to be up with the learner's weights;
        a batch broken by the server going away is generated again when it is back."""
        rollouts: list[Rollout] | None = None
        while True:
            self._sync()
            if rollouts is not None and self.source.from_retired(rollouts):
                rollouts = None                  # made by a process that has restarted since
            lost = False
            if rollouts is None:
                try:
                    rollouts = self.source.generate(prompts, params, samples_per_prompt)
                except ServerLost as err:
                    log.warning("ppo: a rollout from %s broke off (%s): waiting for the server", self.config.server, err)
                    lost = True
                except TooStale:
                    if not self._restarted_now():
                        raise
                    lost = True
            if not any_rank(lost):
                break
        self.used.update(r.meta.get("instance_id", "") for r in rollouts)
        return rollouts

    def _restarted_now(self) -> bool:
        try:
            return self.watch.restarted(self.watch.probe(), self.source.learner_version)
        except TandemError as err:
            if not is_transient(err):
                raise
            return True

    def _sync(self) -> None:
        """Before a rollout batch: is the server up, the same process, with the learner's weights? If not,
        wait for it, and push the learner's actor again when it lost it (collective)."""
        down, restarted = False, False
        try:
            state = self.watch.probe()
            restarted = self.watch.restarted(state, self.source.learner_version)
        except TandemError as err:
            if not is_transient(err):
                raise
            down = True
        if not any_rank(down or restarted):
            self.watch.adopt(state)
            return
        state = self._reconnect()
        served = shared_int(state.version)
        if served >= self.source.learner_version:
            return
        if self.pushing:                         # it lost the learner's weights: push them again
            self._push(self.actor, self.source.learner_version,
                       f"{self.config.output_dir}: v{self.source.learner_version} again, after a server restart")
        else:                                    # not ours to restore: count samples at its version
            log.warning("ppo: the server at %s now serves v%d (was v%d) and push_weights is off", self.config.server,
                        served, self.source.learner_version)
            self.source.learner_version = served

    def _reconnect(self) -> ServerState:
        """Wait until the server answers (ServerDown past the limit, on every rank); when it restarted, drop
        what the old process made. Collective."""
        state = self.watch.wait_up()
        if any_rank(state is None):
            raise self.watch.down()
        restarted = self.watch.restarted(state, self.source.learner_version)
        if any_rank(restarted):
            self.restarts += 1
            old = self.watch.last.instance if self.watch.last is not None else ""
            log.warning("ppo: the server at %s restarted (instance %s -> %s, version %d, learner v%d): dropping "
                        "the old process's rollouts", self.config.server, old or "?", state.instance or "?",
                        state.version, self.source.learner_version)
            self.source.server_restarted(old if old != state.instance else "")
        self.source.reopen()
        self.watch.adopt(state)
        return state

    # ---------------------------------------------------------------- pushes
    def _push(self, actor, version: int, origin: str) -> PushReport | None:
        """Push `actor` as `version` until the server has it (collective; rank 0's report, else None)."""
        while True:
            report, err = None, None
            try:
                report = push_actor(actor, self.config.server, self.token, version, origin=origin,
                                    encoding=self.encoding, timeout=self.config.rpc_timeout_s,
                                    credentials=self.credentials)
            except TandemError as e:          # rank 0 only, after every rank has walked the parameters
                err = e
            outcome = shared_int(0 if err is None else 1 if is_transient(err) else 2)
            if outcome == 0:
                return report
            if outcome == 2:
                raise err if err is not None else RuntimeError(f"rank 0's weight push v{version} was refused")
            log.warning("ppo: pushing v%d to %s failed (%s): waiting for the server", version, self.config.server,
                        err if err is not None else "on rank 0")
            state = self._reconnect()
            if shared_int(state.version) >= version:    # it was swapped in before the answer got lost
                return None

    @property
    def exact_pushes(self) -> bool:
        """Whether the server serves exactly the learner's weights at the learner's version (fp32 pushes)."""
        return self.pushing and self.encoding == "float32"

    def after_iteration(self, iteration: int, models, stats: dict) -> None:
        """With push_weights: push the actor as the learner's next version, which the next rollout uses."""
        if not self.pushing:
            return
        version = self.source.learner_version + 1
        report = self._push(models.actor, version, f"{self.config.output_dir}: ppo iteration {iteration}")
        self.source.learner_version = version
        if report is not None:
            self.pushes.append({"iteration": iteration, **asdict(report)})

    def state_dict(self) -> dict:
        """This rank's part of a resumable checkpoint: how many seeded rollout calls it has made, so a resumed
        run does not draw the same sampling seeds again."""
        return {"rollout_calls": self.source.calls}

    def load_state_dict(self, state: dict) -> None:
        self.source.calls = int(state.get("rollout_calls", self.source.calls))

    def summary(self) -> dict:
        """What run_ppo's result reports about the server side."""
        return {"first_version": self.first_version, "final_version": self.source.learner_version,
                "pushes": self.pushes, "rollout": dict(self.source.totals), "server_restarts": self.restarts,
                "rollout_instances": dict(self.used)}

    def close(self) -> None:
        self.source.close()
