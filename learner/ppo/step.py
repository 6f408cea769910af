"""Step 3: `run_ppo(config)`: load the four models, draw prompts, and run PPO iterations.

Checkpoints under config.output_dir: `actor/` (the consolidated HF folder the server loads), `critic/`
(value model), `actor_ema/` (when ema_decay > 0), and resumable DeepSpeed checkpoints in `resume/`:
the actor's and critic's weights, optimizer and scheduler (DeepSpeed's own), with the iteration, the KL
controller, the reward normalisation, the prompt position and the EMA copy in the actor's client_state,
and what only each rank knows (its random states, its minibatch shuffle, its rollout seed counter) in
`resume/ranks/<tag>/rank<r>.pt`. A resumed run therefore draws the prompts, samples and minibatches the
uninterrupted run would have; with rollout=remote it pushes the resumed actor before its first rollout.
On the embedded task the gold score of greedy responses on held-out prompts is measured before and
after PPO (the gold judge is hidden from training; compare it with the learned reward score).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import ConfigError
from common.progress import progress
from learner import checkpoint, ds
from learner.config import PPOConfig, samples_per_prompt
from learner.data import CausalLMCollator, PromptDataset, TextDataset
from learner.ds import all_sum, loader, seed_everything
from learner.inputs import cache_dir, check_inputs, read_dataset, step_samples
from learner.metrics import MetricsLogger
from learner.ppo.gold import GoldJudge, gold_judge_for
from learner.ppo.models import PPOModels, load_models
from learner.ppo.trainer import PPOTrainer
from learner.rollout.local import LocalRolloutSource, RolloutSource, SamplingParams
from learner.rollout.prompts import PromptStream
from learner.rollout.server_link import ServerLink

log = logging.getLogger(__name__)

AfterIteration = Callable[[int, PPOModels, dict], None]


def _ptx_batches(config: PPOConfig, tokenizer):
    """An endless iterator of ptx (plain-text LM) batches, or None when ptx_coef is 0."""
    if config.ptx_coef <= 0:
        return None
    samples = [s for spec in config.ptx_data for s in read_dataset(spec, seed=config.seed).samples]
    dataset = TextDataset(samples, tokenizer, config.max_seq_len, cache_dir(config))
    if len(dataset) == 0:
        raise ConfigError("ptx_data", f"no usable text in {config.ptx_data}")
    batches = loader(dataset, CausalLMCollator(tokenizer.pad_token_id), config.mini_batch_size, shuffle=True,
                     seed=config.seed)

    def cycle():
        epoch = 0
        while True:
            batches.sampler.set_epoch(epoch)
            yield from batches
            epoch += 1

    return cycle()


def _save(models: PPOModels, trainer: PPOTrainer, tokenizer, out: Path, iteration: int, prompts: PromptStream,
          link: ServerLink | None) -> dict[str, str]:
    state = {"iteration": iteration, **trainer.state_dict(), "prompts": prompts.state_dict()}
    actor_state = dict(state)
    if models.ema is not None:
        actor_state["ema"] = models.ema.state_dict()        # gathered onto rank 0, which writes client_state
    checkpoint.save_resumable(models.actor, out / "resume" / "actor", f"iter{iteration}", actor_state)
    checkpoint.save_rank_state(out / "resume" / "ranks", f"iter{iteration}", {
        "rng": ds.rng_state(), "minibatch_generator": trainer.generator.get_state(),
        **({"link": link.state_dict()} if link is not None else {})})
    paths = {"checkpoint": str(checkpoint.save_hf(models.actor, tokenizer, out / "actor"))}
    if models.critic is not None:
        checkpoint.save_resumable(models.critic, out / "resume" / "critic", f"iter{iteration}", state)
        paths["critic_checkpoint"] = str(checkpoint.save_hf(models.critic, tokenizer, out / "critic", value_head=True))
    if models.ema is not None:
        paths["ema_checkpoint"] = str(checkpoint.save_hf(models.ema.engine, tokenizer, out / "actor_ema"))
    return paths


def _resume(config: PPOConfig, models: PPOModels, trainer: PPOTrainer, prompts: PromptStream,
            out: Path) -> tuple[int, dict]:
    """The iteration to start from (0 unless config.resume finds checkpoints) and this rank's saved state
    ({} when none); the models, optimizers, trainer, prompt position and EMA are restored here."""
    if not config.resume:
        return 0, {}
    actor_state = checkpoint.load_resumable_state(models.actor, out / "resume" / "actor")
    if actor_state is None:
        return 0, {}
    if models.critic is not None and checkpoint.load_resumable_state(models.critic, out / "resume" / "critic") is None:
        raise RuntimeError(f"{out / 'resume'}: an actor checkpoint without its critic")
    tag, state = actor_state
    iteration = int(state["iteration"])
    trainer.load_state_dict(state)
    prompts.load_state_dict(state.get("prompts", {"batches_taken": iteration}))   # one batch per iteration
    if models.ema is not None:
        if "ema" in state:
            models.ema.load_state_dict(state["ema"])
        else:
            log.warning("ppo: %s holds no EMA copy (an older checkpoint): the EMA restarts from the resumed actor", tag)
            models.ema.update(models.actor, decay=0.0)
    rank_state = checkpoint.load_rank_state(out / "resume" / "ranks", tag)
    if rank_state is None:
        log.warning("ppo: %s holds no random states for rank %d: sampling does not continue the interrupted run's",
                    tag, ds.rank())
        rank_state = {}
    elif "minibatch_generator" in rank_state:
        trainer.generator.set_state(rank_state["minibatch_generator"])
    log.info("ppo: resumed from %s (iteration %d, %d prompt batches drawn)", tag, iteration, prompts.taken)
    return iteration, rank_state


def run_ppo(config: PPOConfig, rollout_source: RolloutSource | None = None,
            after_iteration: AfterIteration | None = None) -> dict:
    """Train step 3 and return the final metrics. `rollout_source` defaults to local HF generate on the
    actor, or with rollout="remote" to the server at config.server (learner.rollout.server_link: the
    actor is pushed there when push_weights); `after_iteration(i, models, metrics)` runs after each
    iteration, after the push."""
    config.validate()
    check_inputs(config, ("actor_model", "critic_model", "reward_model", "tokenizer"))
    ds.init_distributed()
    seed_everything(config.seed)        # the same random heads and LoRA weights on every rank
    models = load_models(config)
    seed_everything(config.seed + 1000 * (ds.rank() + 1))  # then different samples on each rank
    tokenizer = models.tokenizer
    train_samples, _ = step_samples(config, "ppo")
    prompts = PromptStream(PromptDataset(train_samples, tokenizer, config.max_prompt_len, cache_dir(config)),
                           config.rollout_batch_size, config.seed)
    if rollout_source is None and config.rollout == "local":
        rollout_source = LocalRolloutSource(models.actor, tokenizer)
    trainer = PPOTrainer(config, models.actor, models.critic, models.reference, models.reward,
                         tokenizer.pad_token_id, ema=models.ema, ptx_batches=_ptx_batches(config, tokenizer))
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                            top_p=config.top_p, top_k=config.top_k, min_new_tokens=config.min_new_tokens,
                            ignore_eos=config.ignore_eos, logprobs_mode=config.logprobs_mode)
    group = samples_per_prompt(config)  # responses per prompt (grpo/rloo compare them with each other)
    gold: GoldJudge | None = gold_judge_for(config, tokenizer)
    out = Path(config.output_dir)
    result: dict = {"prompts": len(prompts.dataset), "algo": config.algo, "samples_per_prompt": group}
    start, rank_state = _resume(config, models, trainer, prompts, out)
    left = [config.iterations - start]           # iterations whose prompts are still to be drawn
    link = None
    if rollout_source is None:                   # rollout = remote: the server rolls out, the actor is pushed
        link = ServerLink.open(config, models.actor, upcoming=lambda: prompts.peek().ids if left[0] > 0 else [],
                               start_iteration=start)
        link.load_state_dict(rank_state.get("link", {}))
        rollout_source = link
        trainer.server_busy = link.source.generating
    if "rng" in rank_state:
        ds.set_rng_state(rank_state["rng"])      # last: sampling goes on where the interrupted run was
    try:
        result.update(_iterations(config, models, trainer, prompts, rollout_source, gold, out, start, left,
                                  params, link, after_iteration))
        result["iterations"] = config.iterations
        result.update(_save(models, trainer, tokenizer, out, config.iterations, prompts, link))
    finally:
        if link is not None:
            link.close()
    return result


def _iterations(config: PPOConfig, models: PPOModels, trainer: PPOTrainer, prompts: PromptStream,
                rollout_source: RolloutSource, gold: GoldJudge | None, out: Path, start: int, left: list[int],
                params: SamplingParams, link: ServerLink | None, after_iteration: AfterIteration | None) -> dict:
    """PPO iterations start..config.iterations-1 (gold-judged before and after on the embedded task)."""
    result: dict = {}
    tokenizer = models.tokenizer
    group = samples_per_prompt(config)  # responses per prompt (grpo/rloo compare them with each other)
    with MetricsLogger(out) as metrics:
        if gold is not None:
            result["gold_before"] = gold.evaluate(models.actor)
            metrics.log(start, gold_eval=result["gold_before"])
            log.info("ppo: gold score of greedy responses before PPO: %.2f", result["gold_before"])
        bar = progress(range(start, config.iterations), desc="ppo", disable=ds.rank() != 0, dynamic_ncols=True)
        for iteration in bar:
            began = time.perf_counter()
            batch = prompts.next_batch()
            left[0] -= 1
            if isinstance(rollout_source, LocalRolloutSource):
                rollout_source.weight_version = trainer.fresh_version = iteration
            elif link is not None and link.exact_pushes:      # the server holds exactly the learner's weights
                trainer.fresh_version = link.source.learner_version
            rollouts = rollout_source.generate(batch.ids, params, group) if group > 1 else \
                rollout_source.generate(batch.ids, params)
            generated = time.perf_counter()
            stats = trainer.step(rollouts)
            new_tokens = sum(len(r.response_ids) for r in rollouts)
            if gold is not None:
                stats["gold_score"] = gold.score_rollouts([t for t in batch.texts for _ in range(group)], rollouts)
            keys = sorted(stats)
            averaged = all_sum([stats[k] for k in keys])
            stats = {k: v / ds.world_size() for k, v in zip(keys, averaged)}
            elapsed = time.perf_counter() - began
            samples, tokens = all_sum([float(len(rollouts)), float(new_tokens)])
            stats.update(samples_per_s=samples / elapsed, tokens_per_s=tokens / elapsed,
                         generate_s=generated - began, train_s=elapsed - (generated - began))   # train_s: experience + update
            if link is not None:
                stats["server_restarts"] = float(link.restarts)      # the same on every rank
            metrics.log(iteration + 1, **stats)
            bar.set_postfix(reward=f"{stats['reward_score']:.3f}", kl=f"{stats['kl']:.3f}",
                            **({"gold": f"{stats['gold_score']:.1f}"} if "gold_score" in stats else {}))
            if (iteration + 1) % config.log_every == 0 or iteration + 1 == config.iterations:
                log.info("ppo iteration %d: %s", iteration + 1, {k: round(v, 4) for k, v in stats.items()})
            if config.save_every and (iteration + 1) % config.save_every == 0:
                _save(models, trainer, tokenizer, out, iteration + 1, prompts, link)
            if link is not None:
                link.after_iteration(iteration + 1, models, stats)   # the push: the next rollout uses it
            if after_iteration is not None:
                after_iteration(iteration + 1, models, stats)
            result.update({k: stats[k] for k in keys})
            result.update(samples_per_s=stats["samples_per_s"], tokens_per_s=stats["tokens_per_s"])
        if gold is not None:
            result["gold_after"] = gold.evaluate(models.actor)
            metrics.log(config.iterations, gold_eval=result["gold_after"])
            if models.ema is not None:
                result["gold_after_ema"] = gold.evaluate(models.ema.engine)
            log.info("ppo: gold score before %.2f, after %.2f (KL to reference %.3f)", result["gold_before"],
                     result["gold_after"], result.get("kl", float("nan")))
    if link is not None:
        result.update(link.summary())
    return result
