"""One PPO iteration: make the experience batch from rollouts, then train actor and critic on it.

`config.algo` picks the advantage estimator: PPO's GAE over the critic's values, or a critic-free one
(GRPO, RLOO, REINFORCE++: learner.ppo.advantages), for which no critic is loaded or trained. Everything
else (the clipped surrogate, importance correction of stale samples, EMA, ptx) is shared.

Models: actor and critic are training DeepSpeed engines; reference and reward are frozen (engines under
ZeRO-3, plain modules otherwise). Everything PPO needs from the "old" policy and critic (logprobs,
values, advantages, returns) is computed once when the batch is made; each PPO epoch then reshuffles
the batch into minibatches, so reusing a batch never moves the targets (a DeepSpeed-Chat failure mode).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from learner import ds
from learner.config import PPOConfig, samples_per_prompt
from learner.modeling import has_dropout
from learner.ppo import advantages as adv
from learner.ppo import math as pm
from learner.ppo.ema import ActorEMA
from learner.ppo.experience import ExperienceBatch, SequenceBatch
from learner.ppo.forward import ChunkPlan, reward_scores, sequence_logprobs, sequence_values
from learner.ppo.processing import processing_for
from learner.rollout.local import Rollout

log = logging.getLogger(__name__)

__all__ = ["PPOTrainer", "reward_scores", "sequence_logprobs", "sequence_values"]


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op threads set to `threads` inside (0: unchanged), restored after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class PPOTrainer:
    def __init__(self, config: PPOConfig, actor, critic, reference, reward, pad_id: int,
                 ema: ActorEMA | None = None, ptx_batches: Iterator[dict[str, torch.Tensor]] | None = None):
        self.config, self.pad_id = config, pad_id
        self.actor, self.critic, self.reference, self.reward = actor, critic, reference, reward
        self.ema, self.ptx_batches = ema, ptx_batches
        self.kl_ctl = (pm.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
                       if config.adaptive_kl else pm.FixedKLController(config.kl_coef))
        self.reward_stats = pm.RunningMeanStd()
        self.generator = torch.Generator().manual_seed(config.seed + ds.rank())
        self.group = samples_per_prompt(config)
        self.device = ds.device()
        self.processing = processing_for(config)   # the ratios' distribution; None: raw (config.logprobs_mode)
        # the learner's weight version when rollouts made by the very weights being trained carry this version
        # (local rollouts; a server that gets every push exactly); None: no rollout is taken as fresh
        self.fresh_version: int | None = None
        self.last_fresh = 0.0
        self.actor_dropout = has_dropout(ds.unwrap(actor))
        # whether the server is generating for this learner right now (run_ppo sets it for remote rollouts):
        # update phases then keep the process's threads, leaving config.update_threads for when it is idle
        self.server_busy: Callable[[], bool] = lambda: False

    # ------------------------------------------------------------------ experience
    def fresh_rows(self, rollouts: list[Rollout]) -> torch.Tensor:
        """[B] bool: rows made by exactly the weights being trained, whose behaviour logprobs then are the old
        policy's (see fresh_version)."""
        # with processed ratios the KL still needs the actor's raw logprobs, so its forward runs anyway
        if self.fresh_version is None or not self.config.reuse_rollout_logprobs or self.processing is not None:
            return torch.zeros(len(rollouts), dtype=torch.bool)
        return torch.tensor([r.weight_version == self.fresh_version and len(r.logprobs) == len(r.response_ids)
                             for r in rollouts], dtype=torch.bool)

    def chunk_plan(self, attention_mask: torch.Tensor, prompt_width: int) -> ChunkPlan:
        """How experience forwards split the batch: length-sorted chunks of sort_chunk_rows rows, or batch order;
        never more than mini_batch_size rows at once (bounding the activation memory)."""
        rows = self.config.sort_chunk_rows
        if rows:
            return ChunkPlan.make(attention_mask, prompt_width, min(rows, self.config.mini_batch_size))
        return ChunkPlan.in_order(attention_mask.shape[0], self.config.mini_batch_size)

    @torch.no_grad()
    def make_experience(self, rollouts: list[Rollout]) -> ExperienceBatch:
        seq = SequenceBatch.from_rollouts(rollouts, self.pad_id)
        ids, attn = seq.input_ids.to(self.device), seq.attention_mask.to(self.device)
        mask = seq.action_mask.to(self.device)
        width = seq.prompt_width
        behaviour = seq.behaviour_logprobs.to(self.device)
        self.actor.eval()
        if self.critic is not None:
            self.critic.eval()
        plan = self.chunk_plan(attn, width)
        fresh = self.fresh_rows(rollouts).to(self.device)
        logprobs = behaviour.clone()                    # fresh rows (raw ratios): generate's are the old policy's
        ratio_logprobs = logprobs if self.processing is None else behaviour.clone()
        logprobs_pending = self.logprobs_in_update(len(rollouts))
        stale = (~fresh).nonzero().squeeze(1) if not logprobs_pending else torch.zeros(0, dtype=torch.long)
        if len(stale):                                  # veRL's use_rollout_log_probs: no actor forward when none
            sub = plan if len(stale) == len(rollouts) else self.chunk_plan(attn[stale], width)
            out = sub.run(sequence_logprobs, self.actor, ids[stale], attn[stale], width, processing=self.processing)
            raw, ratio = out if self.processing is not None else (out, out)
            logprobs[stale] = raw
            ratio_logprobs[stale] = ratio               # the same tensor as logprobs for raw ratios
        ref_logprobs = plan.run(sequence_logprobs, self.reference, ids, attn, width).float()
        values_pending = self.values_in_update(len(rollouts))
        values = (plan.run(sequence_values, self.critic, ids, attn, width).float()
                  if self.critic is not None and not values_pending else torch.zeros_like(logprobs))
        raw_score = plan.run(reward_scores, self.reward, ids, attn, width).float()
        self.last_fresh = float(fresh.float().mean())
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        if len(rollouts) > 1 and raw_score.std().item() < 1e-6:
            log.warning("the reward model gives every response the same score (%.4f): collapsed reward model?",
                        raw_score[0].item())
        score = raw_score
        if self.config.normalize_reward:
            self.reward_stats.update(raw_score)
            score = self.reward_stats.normalize(raw_score)
        if self.config.missing_eos_penalty > 0:   # the reward model never saw a response without its EOS
            unfinished = torch.tensor([r.finish_reason != "stop" for r in rollouts], device=score.device)
            score = score - self.config.missing_eos_penalty * unfinished.to(score.dtype)
        if values_pending or logprobs_pending:          # filled in by train_on, from the update forwards
            rewards = advantages = returns = torch.zeros_like(logprobs)
        else:
            rewards, advantages, returns = self.advantages(logprobs, ref_logprobs, values, score, mask)
        return ExperienceBatch(
            input_ids=ids, attention_mask=attn, action_mask=mask, logprobs=logprobs * mask,
            ratio_logprobs=ratio_logprobs * mask, ref_logprobs=ref_logprobs * mask, behaviour_logprobs=behaviour,
            values=values * mask, rewards=rewards, advantages=advantages, returns=returns, score=score,
            raw_score=raw_score, weight_versions=seq.weight_versions.to(self.device), prompt_width=width,
            values_pending=values_pending, logprobs_pending=logprobs_pending)

    def one_pass(self, rows: int) -> bool:
        """One PPO epoch over a batch that is one minibatch (DeepSpeed-Chat's step-3 setting): each model's update
        forward then runs before any of its weights moves and sees every row, so it gives exactly the "old"
        figures an experience forward would, one forward fewer."""
        c = self.config
        return self.critic is not None and c.algo == "ppo" and c.ppo_epochs == 1 and rows <= c.mini_batch_size

    def values_in_update(self, rows: int) -> bool:
        """Whether the critic's old values come from its update forward (see one_pass)."""
        return self.config.values_in_update and self.one_pass(rows)

    def logprobs_in_update(self, rows: int) -> bool:
        """Whether the actor's old logprobs come from its update forward (see one_pass), for stale rollouts too:
        with raw ratios (processed ones need a second distribution) and an actor without dropout (the update
        forward runs in train mode)."""
        return (self.config.logprobs_in_update and self.processing is None and not self.actor_dropout
                and self.one_pass(rows))

    def fill_old(self, mb: ExperienceBatch, logprobs: torch.Tensor | None = None,
                 values: torch.Tensor | None = None) -> None:
        """A pending batch gets what an update forward gave (the actor's logprobs or the critic's values,
        detached) and, once nothing is pending, the rewards, advantages and returns that follow."""
        if logprobs is not None:
            mb.logprobs = mb.ratio_logprobs = logprobs.detach().float() * mb.action_mask
            mb.logprobs_pending = False
        if values is not None:
            mb.values, mb.values_pending = values.detach().float() * mb.action_mask, False
        if not mb.pending:
            mb.rewards, mb.advantages, mb.returns = self.advantages(mb.logprobs, mb.ref_logprobs, mb.values,
                                                                    mb.score, mb.action_mask)

    def advantages(self, logprobs, ref_logprobs, values, score, mask):
        """(per-token rewards, advantages, returns) [B, T] by config.algo; see learner.ppo.advantages."""
        c, kl = self.config, self.kl_ctl.value
        algo = c.algo
        if algo in ("ppo", "reinforce++"):
            rewards = pm.kl_penalized_rewards(logprobs, ref_logprobs, score, mask, kl, c.clip_reward_value)
            if algo == "reinforce++":
                advantages = pm.whiten(adv.returns_to_go(rewards, mask, c.gamma), mask)
                return rewards, advantages, advantages
            advantages, returns = pm.gae(values, rewards, mask, c.gamma, c.lam)
            if c.whiten_advantages:
                advantages = pm.whiten(advantages, mask)
            return rewards, advantages, returns
        clipped = score.clamp(-c.clip_reward_value, c.clip_reward_value)
        if algo == "grpo":              # the KL is a loss term (actor_step), not a reward
            rewards = pm.kl_penalized_rewards(logprobs, ref_logprobs, clipped, mask, 0.0, c.clip_reward_value)
            advantages = adv.per_token(adv.group_normalized(clipped, self.group), mask)
        else:                           # rloo: the KL penalty is folded into the sequence reward
            rewards = pm.kl_penalized_rewards(logprobs, ref_logprobs, clipped, mask, kl, c.clip_reward_value)
            penalized = adv.kl_penalized_scores(clipped, logprobs, ref_logprobs, mask, kl)
            advantages = adv.per_token(adv.leave_one_out(penalized, self.group), mask)
        return rewards, advantages, advantages

    # ------------------------------------------------------------------ training
    def importance_weights(self, mb: ExperienceBatch) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Remote rollouts: truncated importance ratios min(exp(old - behaviour), cap) per response token,
        moving samples made by other (stale) weights onto the learner's old policy. Applied to every row:
        for a fresh row the ratio is 1 up to numerics. Local rollouts: none."""
        if self.config.rollout != "remote":
            return None, {}
        from learner.rollout.staleness import DEFAULT_CAP, truncated_importance_ratios

        weights, stats = truncated_importance_ratios(mb.ratio_logprobs, mb.behaviour_logprobs, mb.action_mask,
                                                     cap=DEFAULT_CAP)
        return weights, stats.metrics()

    def actor_logprobs(self, mb: ExperienceBatch):
        """The actor's logprobs of the batch, with their graph (a pair with processing: see sequence_logprobs);
        one update phase."""
        with self.update_threads():
            return sequence_logprobs(self.actor, mb.input_ids, mb.attention_mask, mb.prompt_width, self.processing)

    def actor_step(self, mb: ExperienceBatch, logprobs: torch.Tensor | None = None) -> dict[str, float]:
        """One actor update on mb; `logprobs`: its forward's, already run (raw ratios)."""
        if logprobs is None:
            logprobs = self.actor_logprobs(mb)
        with self.update_threads():
            return self._actor_update(mb, logprobs)

    def _actor_update(self, mb: ExperienceBatch, logprobs) -> dict[str, float]:
        ratio_logprobs = logprobs
        if self.processing is not None:
            logprobs, ratio_logprobs = logprobs
        weights, weight_stats = self.importance_weights(mb)
        loss, stats = pm.policy_loss(ratio_logprobs, mb.ratio_logprobs, mb.advantages, mb.action_mask, self.config.cliprange,
                                     weights, cliprange_high=self.config.cliprange_high)
        out = {"actor_loss": loss.item(), "clip_fraction": stats["clip_fraction"].item(),
               "policy_kl": stats["approx_kl"].item(), **weight_stats}
        if self.config.algo == "grpo" and self.kl_ctl.value > 0:
            kl_loss = adv.k3_kl(logprobs, mb.ref_logprobs, mb.action_mask)
            loss = loss + self.kl_ctl.value * kl_loss
            out["kl_loss"] = kl_loss.item()
        if self.ptx_batches is not None and self.config.ptx_coef > 0:
            batch = {k: v.to(self.device) for k, v in next(self.ptx_batches).items()}
            ptx_loss = self.actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"], use_cache=False).loss
            loss = loss + self.config.ptx_coef * ptx_loss
            out["ptx_loss"] = ptx_loss.item()
        self.actor.backward(loss)
        self.actor.step()
        return out

    def critic_step(self, mb: ExperienceBatch) -> dict[str, float]:
        with self.update_threads():
            values = sequence_values(self.critic, mb.input_ids, mb.attention_mask)
            if mb.values_pending:
                self.fill_old(mb, values=values)
            loss, stats = pm.value_loss(values, mb.values, mb.returns, mb.action_mask, self.config.cliprange_value)
        with self.update_threads():
            self.critic.backward(loss)
            self.critic.step()
        return {"critic_loss": loss.item(), "value_clip_fraction": stats["value_clip_fraction"].item()}

    def update_threads(self):
        """The torch threads of one update phase (a forward, or a backward and step): config.update_threads,
        unless the server is generating on the cores they would take (server_busy), chosen afresh each phase."""
        return torch_threads(0 if self.server_busy() else self.config.update_threads)

    def train_on(self, exp: ExperienceBatch) -> dict[str, float]:
        """ppo_epochs passes over the batch, reshuffled into minibatches each pass; mean stats."""
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for _ in range(self.config.ppo_epochs):
            # pending: the batch is its own one minibatch (order is immaterial), filled in place
            batches = [exp] if exp.pending else exp.minibatches(self.config.mini_batch_size, self.generator)
            for mb in batches:
                logprobs = None
                if mb.logprobs_pending:     # the actor's forward first: its old logprobs enter the advantages
                    logprobs = self.actor_logprobs(mb)
                    self.fill_old(mb, logprobs=logprobs)
                critic = self.critic_step(mb) if self.critic is not None else {}
                for k, v in {**self.actor_step(mb, logprobs), **critic}.items():
                    sums[k] += v
                count += 1
        return {k: v / count for k, v in sums.items()}

    def step(self, rollouts: list[Rollout]) -> dict[str, float]:
        """One PPO iteration on these rollouts; returns its metrics."""
        began = time.perf_counter()
        exp = self.make_experience(rollouts)
        made = time.perf_counter()
        stats = self.train_on(exp)
        stats.update(experience_s=made - began, update_s=time.perf_counter() - made, fresh_fraction=self.last_fresh)
        kl = pm.sequence_kl(exp.logprobs, exp.ref_logprobs, exp.action_mask)
        kl_mean = kl.mean().item()
        self.kl_ctl.update(kl_mean, len(exp))
        if self.ema is not None:
            self.ema.update(self.actor)
        mask = exp.action_mask
        stats.update({
            "reward_score": exp.raw_score.mean().item(),
            "reward_score_std": exp.raw_score.std().item() if len(exp) > 1 else 0.0,
            "kl": kl_mean, "kl_coef": self.kl_ctl.value,
            "return": pm.masked_mean(exp.returns, mask).item(),
            "response_length": mask.sum(1).mean().item(),
        })
        if self.critic is not None:
            stats["value"] = pm.masked_mean(exp.values, mask).item()
        return stats

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_ctl.value, "reward_stats": self.reward_stats.state_dict(),
                "ema_updates": self.ema.updates if self.ema else 0}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.value = state["kl_coef"]
        self.reward_stats.load_state_dict(state["reward_stats"])
        if self.ema is not None:
            self.ema.updates = state.get("ema_updates", 0)
