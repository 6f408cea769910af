"""Configuration of the three learner steps: dataclasses with defaults, validated once at the edge.

A config comes from defaults, then an optional JSON file (`--config FILE`), then command-line
options; `validate()` raises ConfigError naming the field. PPO defaults follow DeepSpeed-Chat's
step-3 script where it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError

STEPS = ("sft", "reward", "ppo")
ALGOS = ("ppo", "grpo", "rloo", "reinforce++")    # step 3's advantage estimators (learner.ppo.advantages)
GROUP_ALGOS = ("grpo", "rloo")                    # those whose baseline is the other samples of the prompt
LOGPROBS_MODES = ("raw", "processed")             # the distribution of the policy ratios (learner.ppo.processing)


@dataclass
class DeepSpeedOptions:
    zero_stage: int = 3                 # 0..3
    dtype: str = "float32"              # float32 | bfloat16 (fp16 is refused: it overflows, see DS-Chat issues)
    offload_optimizer: bool = False     # ZeRO-Offload of optimizer states to CPU
    gradient_clipping: float = 1.0
    num_ranks: int = 1                  # for `tandem learn`, which execs the deepspeed launcher
    # ZeRO++ (stage 3): quantized weight all-gathers (qwZ), quantized gradient reduce-scatter (qgZ) and a
    # secondary weight partition of this many ranks (hpZ, 0 = off). On CPU, DeepSpeed 0.19.8 accepts qgZ and
    # hpZ but changes nothing (losses bit-identical to plain ZeRO-3), and qwZ fails in its CPU backend (no
    # quantizer op), so it is refused there, naming the field. Their effect needs a GPU.
    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False
    zero_hpz_partition_size: int = 0

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype", f"must be float32 or bfloat16, got {self.dtype!r}")
        if self.gradient_clipping < 0:
            raise ConfigError("gradient_clipping", f"must be >= 0, got {self.gradient_clipping}")
        if self.num_ranks < 1:
            raise ConfigError("num_ranks", f"must be >= 1, got {self.num_ranks}")
        zero_pp = self.zero_quantized_weights or self.zero_quantized_gradients or self.zero_hpz_partition_size
        if zero_pp and self.zero_stage != 3:
            raise ConfigError("zero_stage", f"ZeRO++ options need zero_stage 3, got {self.zero_stage}")
        if self.zero_hpz_partition_size < 0:
            raise ConfigError("zero_hpz_partition_size", f"must be >= 0, got {self.zero_hpz_partition_size}")


@dataclass
class LoraOptions:
    lora_dim: int = 0                   # 0: no LoRA
    lora_alpha: float = 16.0
    lora_module_name: str = ""          # substring of module names to wrap ("" = all linear layers)
    only_optimize_lora: bool = False

    def validate(self) -> None:
        if self.lora_dim < 0:
            raise ConfigError("lora_dim", f"must be >= 0, got {self.lora_dim}")
        if self.only_optimize_lora and self.lora_dim == 0:
            raise ConfigError("lora_dim", "only_optimize_lora needs lora_dim > 0 (no LoRA weights to optimise)")


@dataclass
class CommonConfig:
    model: str = ""                     # local HF folder; "" = the embedded default model
    tokenizer: str = ""                 # "" = the model folder's tokenizer
    data: list[str] = field(default_factory=lambda: ["embedded"])  # dataset specs, blended
    data_split: str = "2,4,4"           # DeepSpeed-Chat rule: proportions for steps 1, 2, 3
    output_dir: str = "runs/default"
    seed: int = 1234
    max_seq_len: int = 256
    epochs: int = 1
    max_steps: int = 0                  # 0 = run the epochs
    batch_size: int = 8                 # per rank
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    eval_fraction: float = 0.1          # held out from this step's data for evaluation
    log_every: int = 10
    save_every: int = 0                 # optimizer steps between resumable DeepSpeed checkpoints (0 = at the end only)
    resume: bool = False                # continue from <output_dir>/resume when a checkpoint is there
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% slower)
    cache_dir: str = ""                 # tokenized-data cache; "" = $TANDEM_CACHE/tokenized or ~/.cache/tandem/tokenized
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)

    def validate(self) -> CommonConfig:
        if not self.data:
            raise ConfigError("data", "at least one dataset spec is required")
        try:
            parts = [float(p) for p in self.data_split.split(",")]
        except ValueError:
            raise ConfigError("data_split", f"must be comma-separated numbers, got {self.data_split!r}") from None
        if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
            raise ConfigError("data_split", f"must be three non-negative numbers with a positive sum, got {self.data_split!r}")
        for name in ("max_seq_len", "epochs", "batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError("learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        self.deepspeed.validate()
        self.lora.validate()
        return self


@dataclass
class SFTConfig(CommonConfig):
    output_dir: str = "runs/default/sft"
    mask_prompt: bool = True            # loss on the response tokens only
    sft_only_data: list[str] = field(default_factory=list)  # DS-Chat --sft_only_data_path: all of it to step 1


@dataclass
class RewardConfig(CommonConfig):
    output_dir: str = "runs/default/reward"
    learning_rate: float = 5e-5


# push_quantize -> the wire encoding of a weight push (protos.codec.ENCODINGS)
PUSH_ENCODINGS = {"none": "float32", "float32": "float32", "bfloat16": "bfloat16", "int8": "int8", "int4": "int4"}


@dataclass
class PPOConfig(CommonConfig):
    output_dir: str = "runs/default/ppo"
    actor_model: str = ""               # "" = <run>/sft
    critic_model: str = ""              # "" = <run>/reward (the critic starts from the reward model)
    reward_model: str = ""              # "" = <run>/reward
    rollout: str = "local"              # local (HF generate in the learner) | remote (the generation server)
    server: str = ""                    # host:port for rollout = remote
    algo: str = "ppo"                   # ppo (critic, GAE) | grpo | rloo | reinforce++ (critic-free)
    samples_per_prompt: int = 0         # responses per prompt per iteration; 0 = 1 for ppo/reinforce++, 4 for grpo/rloo
    iterations: int = 20                # PPO iterations (one rollout batch each)
    rollout_batch_size: int = 16        # prompts per iteration (per rank)
    max_prompt_len: int = 128
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # rollouts: sample among the k most likely tokens; 0 = off
    # The distribution PPO's ratio and the importance ratio of stale samples are over: "raw" (the model's own,
    # temperature 1) or "processed" (the one rollouts are sampled from: temperature, top_k, top_p applied).
    # Named as the server's sampling option, which the remote source sends as is, so the learner's logprobs
    # and the server's behaviour logprobs are always of the same distribution. The KL to the reference stays raw.
    logprobs_mode: str = "raw"
    min_new_tokens: int = 0             # rollouts: no EOS before this many tokens
    ignore_eos: bool = False            # rollouts: every response runs to max_new_tokens
    actor_learning_rate: float = 9.65e-6
    critic_learning_rate: float = 5e-6
    ppo_epochs: int = 1                 # passes over one rollout batch
    mini_batch_size: int = 8
    kl_coef: float = 0.1                # DS-Chat kl_ctl
    adaptive_kl: bool = False           # Ziegler et al. controller towards target_kl
    target_kl: float = 6.0
    kl_horizon: int = 10000
    clip_reward_value: float = 5.0
    cliprange: float = 0.2
    cliprange_high: float = 0.0         # upper clip of the ratio (DAPO's clip-higher, e.g. 0.28); 0 = cliprange
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    normalize_reward: bool = False      # running mean/std of the reward score
    missing_eos_penalty: float = 0.0    # subtracted from the score of a response cut at max_new_tokens (no EOS)
    ema_decay: float = 0.0              # 0 = no EMA copy; DS-Chat uses 0.992
    ptx_coef: float = 0.0               # DS-Chat unsup_coef is 27.8 with its own data
    ptx_data: list[str] = field(default_factory=list)
    max_staleness: int = 1              # remote rollout: weight versions a sample may lag
    push_weights: bool = False          # remote rollout: push the actor to the server before the first rollout
                                        # and after every iteration
    push_quantize: str = "none"         # none (fp32) | bfloat16 | int8 | int4
    push_token_file: str = ""           # the server's push credential (else $TANDEM_PUSH_TOKEN)
    server_tls_ca: str = ""             # reach the server over TLS, trusting this CA ("" = plaintext)
    server_tls_cert: str = ""           # a client certificate, for a server that requires one
    server_tls_key: str = ""
    rpc_timeout_s: float = 600.0        # remote rollout: the deadline of one rollout stream or weight push
    server_down_limit_s: float = 300.0  # remote rollout: how long to wait for a server that is gone, then exit
    gold_eval_prompts: int = 64         # task prompts scored by the gold judge (embedded task); = gold.DEFAULT_EVAL_PROMPTS
    # step-3 speed (issue 11): each is exact or within the stated rounding, and each can be turned off
    reuse_rollout_logprobs: bool = True  # a fresh rollout's behaviour logprobs are the old policy's: no actor forward
    frozen_dtype: str = "auto"          # reference and reward models: auto | float32 | bfloat16 (scores only; no
    #                                     training); auto = bf16 where the device multiplies it natively (ds.fast_bf16)
    sort_chunk_rows: int = 4            # experience forwards in length-sorted chunks of this many rows (0: batch order)
    values_in_update: bool = True       # one PPO epoch over one minibatch: the critic's old values come from its
    #                                     update forward (before any weight moves, so exactly the same values)
    logprobs_in_update: bool = True     # the same for the actor's old logprobs (raw ratios, a dropout-free actor):
    #                                     no actor experience forward even for stale rollouts
    update_threads: int = 0             # torch threads of the actor/critic update (0: the process's own); a remote
    #                                     learner sharing cores with its server can take them all here: each
    #                                     update phase (actor forward, critic step, actor step) takes them only
    #                                     once the server has finished generating the next batch

    def validate(self) -> PPOConfig:
        super().validate()
        if self.rollout not in ("local", "remote"):
            raise ConfigError("rollout", f"must be local or remote, got {self.rollout!r}")
        if self.algo not in ALGOS:
            raise ConfigError("algo", f"must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.samples_per_prompt < 0:
            raise ConfigError("samples_per_prompt", f"must be >= 0 (0 = the algorithm's default), got "
                                                    f"{self.samples_per_prompt}")
        if self.algo in GROUP_ALGOS and self.samples_per_prompt == 1:
            raise ConfigError("samples_per_prompt", f"{self.algo} needs >= 2 samples per prompt (its baseline is "
                                                    "the other samples of the same prompt)")
        if self.cliprange_high < 0:
            raise ConfigError("cliprange_high", f"must be >= 0, got {self.cliprange_high}")
        if self.rollout == "remote" and not self.server:
            raise ConfigError("server", "rollout=remote needs server HOST:PORT")
        for name in ("iterations", "rollout_batch_size", "max_prompt_len", "max_new_tokens", "ppo_epochs",
                     "mini_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("actor_learning_rate", "critic_learning_rate"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError("temperature", f"must be > 0 for PPO sampling, got {self.temperature}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("min_new_tokens", f"must be in [0, max_new_tokens={self.max_new_tokens}], "
                                                f"got {self.min_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ConfigError("logprobs_mode", f"must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}")
        if self.logprobs_mode == "processed" and self.min_new_tokens > 0 and not self.ignore_eos:
            raise ConfigError("logprobs_mode", "processed with min_new_tokens > 0 is not supported: the sampler "
                                               "masks EOS below min_new_tokens, which the learner's ratio does not "
                                               "model (use logprobs_mode raw, min_new_tokens 0 or ignore_eos)")
        for name in ("kl_coef", "clip_reward_value", "cliprange", "cliprange_value", "ptx_coef", "missing_eos_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("gamma" if not 0 <= self.gamma <= 1 else "lam", "must be in [0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ptx_data", "ptx_coef > 0 needs ptx_data (plain-text datasets)")
        if self.push_quantize not in PUSH_ENCODINGS:
            raise ConfigError("push_quantize", f"must be one of {', '.join(PUSH_ENCODINGS)}, got {self.push_quantize!r}")
        if self.gold_eval_prompts < 1:
            raise ConfigError("gold_eval_prompts", f"must be >= 1, got {self.gold_eval_prompts}")
        if self.max_staleness < 0:
            raise ConfigError("max_staleness", f"must be >= 0, got {self.max_staleness}")
        if self.frozen_dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError("frozen_dtype", f"must be auto, float32 or bfloat16, got {self.frozen_dtype!r}")
        if self.update_threads < 0:
            raise ConfigError("update_threads", f"must be >= 0 (0: the process's threads), got {self.update_threads}")
        if self.sort_chunk_rows < 0:
            raise ConfigError("sort_chunk_rows", f"must be >= 0 (0: batch order), got {self.sort_chunk_rows}")
        for name in ("rpc_timeout_s", "server_down_limit_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0 seconds, got {getattr(self, name)}")
        return self


def samples_per_prompt(config: PPOConfig) -> int:
    """The responses drawn per prompt per iteration: the config's, or the algorithm's default."""
    if config.samples_per_prompt:
        return config.samples_per_prompt
    return 4 if config.algo in GROUP_ALGOS else 1


CONFIGS = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}
