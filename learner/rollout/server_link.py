"""The one remote-PPO wiring: PPO's rollouts from a generation server, the actor pushed back to it.

    link = ServerLink.open(config, actor, upcoming)   # pushes the starting actor when push_weights
    rollouts = link.source.generate(prompts, params)  # overlapped, bounded staleness
    link.after_iteration(iteration, models, stats)    # pushes the actor, advances the learner's version

run_ppo builds it whenever `rollout = remote`, so `tandem learn ppo --rollout remote --server HOST:PORT`,
`tandem up` and `benchmarks.rlhf` all go through here. With `push_weights` the actor PPO starts from is
pushed before the first rollout (a fresh server, or one serving another model, then serves exactly the
policy being trained) and again after every iteration; without it the server's weights stay as they are
and every sample is counted at the server's version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from clients.weight_push import current_version
from learner import ds
from learner.config import PUSH_ENCODINGS, PPOConfig
from learner.rollout.push import ActorPusher, push_actor
from learner.rollout.remote import RemoteRolloutSource
from protos.auth import channel_credentials, read_token

log = logging.getLogger(__name__)


def shared_int(value: int) -> int:
    """Rank 0's value on every rank."""
    return int(ds.all_sum([float(value) if ds.rank() == 0 else 0.0])[0])


@dataclass
class ServerLink:
    source: RemoteRolloutSource
    pusher: ActorPusher | None
    first_version: int

    @classmethod
    def open(cls, config: PPOConfig, actor, upcoming: Callable[[], list[list[int]]] | None) -> ServerLink:
        encoding = PUSH_ENCODINGS[config.push_quantize]
        tls = None
        if config.server_tls_ca or config.server_tls_cert:
            tls = channel_credentials(config.server_tls_ca or None, config.server_tls_cert or None,
                                      config.server_tls_key or None)
        first = None
        pusher = None
        if config.push_weights:
            token = read_token(config.push_token_file or None)
            first = shared_int(current_version(config.server, credentials=tls) + 1 if ds.rank() == 0 else 0)
            push_actor(actor, config.server, token, first, origin=f"{config.actor_model} (PPO start)",
                       encoding=encoding, credentials=tls)
            pusher = ActorPusher(config.server, token, first, encoding=encoding, origin=config.output_dir,
                                 credentials=tls)
        source = RemoteRolloutSource(config.server, max_staleness=config.max_staleness, learner_version=first,
                                     upcoming=upcoming, seed=config.seed * 7919 + ds.rank(), credentials=tls)
        if pusher is not None:
            pusher.source = source
        log.info("ppo: rollouts from %s (learner v%d, max staleness %d, pushes %s)", config.server,
                 source.learner_version, config.max_staleness, encoding if pusher else "off")
        return cls(source, pusher, source.learner_version)

    @property
    def exact_pushes(self) -> bool:
        """Whether the server serves exactly the learner's weights at the learner's version (fp32 pushes)."""
        return self.pusher is not None and self.pusher.encoding == "float32"

    def after_iteration(self, iteration: int, models, stats: dict) -> None:
        if self.pusher is not None:
            self.pusher(iteration, models, stats)

    def summary(self) -> dict:
        """What run_ppo's result reports about the server side."""
        pushes = self.pusher.reports if self.pusher is not None else []
        return {"first_version": self.first_version,
                "final_version": self.pusher.version if self.pusher is not None else self.first_version,
                "pushes": pushes, "rollout": dict(self.source.totals)}

    def close(self) -> None:
        self.source.close()
