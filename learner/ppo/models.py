"""The four (five with EMA) models of step 3, loaded from the checkpoints of steps 1 and 2.

actor      <- actor_model  (default <run>/sft)     trainable engine, LoRA if configured
reference  <- actor_model                          frozen
critic     <- critic_model (default reward_model)  trainable engine (value model), LoRA if configured
reward     <- reward_model (default <run>/reward)  frozen value model
actor EMA  <- actor_model                          frozen, updated after each iteration (ema_decay > 0)
<run> is the parent of config.output_dir (runs/default/ppo -> runs/default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from learner import ds
from learner.config import PPOConfig
from learner.modeling import ValueModel, apply_lora, load_causal_lm, load_tokenizer
from learner.ppo.ema import ActorEMA

log = logging.getLogger(__name__)


@dataclass
class PPOModels:
    tokenizer: object
    actor: object
    critic: object
    reference: object
    reward: object
    ema: ActorEMA | None
    paths: dict[str, str]


def resolve_paths(config: PPOConfig) -> dict[str, str]:
    """actor/critic/reward folders, defaults filled in from the run folder; ConfigError naming the field."""
    run = Path(config.output_dir).parent
    actor = config.actor_model or str(run / "sft")
    reward = config.reward_model or str(run / "reward")
    paths = {"actor_model": actor, "reward_model": reward, "critic_model": config.critic_model or reward}
    for name, path in paths.items():
        if not (Path(path) / "config.json").is_file():
            step = 1 if name == "actor_model" else 2
            hint = "" if getattr(config, name) else f" (the default; run step {step} first or set {name})"
            raise ConfigError(name, f"no HF model folder (config.json) at {path!r}{hint}")
    return paths


def max_context(path: str) -> int:
    """The model's max_position_embeddings (0 when its config does not say)."""
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 0) or 0)


def load_models(config: PPOConfig) -> PPOModels:
    paths = resolve_paths(config)
    tokenizer = load_tokenizer(config.tokenizer or paths["actor_model"])
    context = max_context(paths["actor_model"])
    if context and config.max_prompt_len + config.max_new_tokens > context:
        raise ConfigError("max_new_tokens", f"max_prompt_len + max_new_tokens = "
                          f"{config.max_prompt_len + config.max_new_tokens} exceeds the actor's context of {context}")
    opts, dtype = config.deepspeed, ds.torch_dtype(config.deepspeed)
    common = dict(batch_size=config.mini_batch_size, grad_accum=config.gradient_accumulation_steps,
                  weight_decay=config.weight_decay, warmup_steps=config.warmup_steps)

    actor_model = apply_lora(load_causal_lm(paths["actor_model"], dtype), config.lora)
    actor = ds.init_engine(actor_model, opts, lr=config.actor_learning_rate, **common)
    critic = None                       # the critic-free algorithms (grpo, rloo, reinforce++) train none
    if config.algo == "ppo":
        critic_model = apply_lora(ValueModel.from_pretrained(paths["critic_model"], dtype), config.lora)
        critic = ds.init_engine(critic_model, opts, lr=config.critic_learning_rate, **common)
    frozen = ds.frozen_dtype(config.frozen_dtype)  # scores only: bf16 where it is fast (half the bytes)
    reference = ds.init_frozen(load_causal_lm(paths["actor_model"], dtype), opts, batch_size=config.mini_batch_size,
                               dtype=frozen)
    reward = ds.init_frozen(ValueModel.from_pretrained(paths["reward_model"], dtype), opts,
                            batch_size=config.mini_batch_size, dtype=frozen)
    ema = None
    if config.ema_decay > 0:
        ema_model = apply_lora(load_causal_lm(paths["actor_model"], dtype), config.lora)
        ema = ActorEMA(ds.init_frozen(ema_model, opts, batch_size=config.mini_batch_size, whole_max_params=0),
                       config.ema_decay)
        ema.update(actor, decay=0.0)  # start equal to the actor (its LoRA initialisation too)
    log.info("%s models: actor %s, critic %s, reward %s (ZeRO-%d, %s; reference and reward in %s)", config.algo,
             paths["actor_model"], paths["critic_model"] if critic is not None else "none",
             paths["reward_model"], opts.zero_stage, opts.dtype, str(frozen).removeprefix("torch."))
    return PPOModels(tokenizer, actor, critic, reference, reward, ema, paths)
