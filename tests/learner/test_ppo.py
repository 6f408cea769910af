"""Step 3 on real parts: TinyStories-656K as actor/reference, value models on its backbone, DeepSpeed
ZeRO-3 engines in one process, HF generate as the rollout source."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.errors import ConfigError
from learner import ds, modeling
from learner.config import DeepSpeedOptions, LoraOptions, PPOConfig
from learner.ds import unwrap as ds_unwrap
from learner.ppo import math as pm
from learner.ppo.models import load_models
from learner.ppo.step import run_ppo
from learner.ppo.trainer import PPOTrainer, sequence_logprobs, sequence_values, torch_threads
from learner.rollout.local import LocalRolloutSource, SamplingParams

NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Mia"]
THINGS = ["ball", "cat", "tree", "cake", "boat", "hat"]


@pytest.fixture(scope="module")
def run_dir(ppo_run):
    """The shared step-3 run folder (tests/learner/conftest.py: sft, reward, prompts) plus ptx text."""
    (ppo_run.root / "stories.txt").write_text("Once upon a time, there was a little dog.\nThe sun was warm and the sky was "
                                              "blue.\n")
    return ppo_run.root


def _config(run_dir, **overrides) -> PPOConfig:
    base = dict(output_dir=str(run_dir / "ppo"), data=[f"dschat:{run_dir / 'prompts.jsonl'}"], data_split="0,0,1",
                rollout_batch_size=8, mini_batch_size=4, max_new_tokens=16, ppo_epochs=2, kl_coef=0.05,
                actor_learning_rate=2e-4, critic_learning_rate=2e-4, cache_dir=str(run_dir / "cache"),
                frozen_dtype="float32", deepspeed=DeepSpeedOptions(zero_stage=3))
    base.update(overrides)
    return PPOConfig(**base).validate()


def test_experience_and_one_ppo_update(run_dir):
    config = _config(run_dir, reuse_rollout_logprobs=False)   # every forward recomputed, fp32 frozen models
    models = load_models(config)
    tok = models.tokenizer
    prompts = [tok(f"Once upon a time, {n} had a {t}.").input_ids for n, t in zip(NAMES, THINGS)] + [[1, 4, 5]]
    rollouts = LocalRolloutSource(models.actor, tok, copy_max_params=0).generate(  # the gather path
        prompts, SamplingParams(max_new_tokens=16, seed=0))
    trainer = PPOTrainer(config, models.actor, models.critic, models.reference, models.reward, tok.pad_token_id)
    exp = trainer.make_experience(rollouts)
    mask = exp.action_mask

    # layout: the mask covers exactly the response tokens; the prompt of different lengths is masked out
    assert mask.sum(1).tolist() == [len(r.response_ids) for r in rollouts]
    # the learner's logprobs of the sampled tokens equal generate's behaviour logprobs (left padding handled)
    torch.testing.assert_close(exp.behaviour_logprobs * mask, exp.logprobs, atol=2e-4, rtol=0)
    # actor == reference before training: no KL, so the summed rewards are the clipped scores alone
    assert pm.sequence_kl(exp.logprobs, exp.ref_logprobs, mask).abs().max().item() < 1e-5
    torch.testing.assert_close(exp.rewards.sum(1), exp.score.clamp(-5, 5), atol=1e-5, rtol=0)
    # the first PPO minibatch sees ratio 1 exactly (train-mode forward == experience forward)
    logp = sequence_logprobs(models.actor, exp.input_ids, exp.attention_mask)
    _, stats = pm.policy_loss(logp, exp.logprobs, exp.advantages, mask, config.cliprange)
    assert stats["clip_fraction"].item() == 0.0 and stats["approx_kl"].item() < 1e-9

    # as a remote source's samples, fresh ones get importance weights of 1 (behaviour == learner logprobs)
    remote = PPOTrainer(dataclasses.replace(config, rollout="remote", server="127.0.0.1:1"), models.actor,
                        models.critic, models.reference, models.reward, tok.pad_token_id)
    weights, weight_stats = remote.importance_weights(exp)
    torch.testing.assert_close(weights, torch.ones_like(weights), atol=5e-4, rtol=0)
    assert weight_stats["is_tokens"] == mask.sum().item()

    old_logprobs = exp.logprobs.clone()
    critic_before = pm.value_loss(sequence_values(models.critic, exp.input_ids, exp.attention_mask).detach(),
                                  exp.values, exp.returns, mask, 1e9)[0].item()
    trainer.train_on(exp)
    assert torch.equal(exp.logprobs, old_logprobs), "the old logprobs must stay fixed across PPO epochs"
    with torch.no_grad():
        new_logp = sequence_logprobs(models.actor, exp.input_ids, exp.attention_mask)
        critic_after = pm.value_loss(sequence_values(models.critic, exp.input_ids, exp.attention_mask),
                                     exp.values, exp.returns, mask, 1e9)[0].item()
    # the policy moved towards positive-advantage tokens, the critic towards the returns
    assert (exp.advantages * (new_logp - old_logprobs) * mask).sum().item() > 0
    assert critic_after < critic_before


def test_processed_logprobs_mode_puts_the_ratios_on_the_sampled_distribution(run_dir):
    """logprobs_mode "processed" at temperature 0.7 with top_k 5: the ratios' old logprobs are the processed ones
    (equal to a fresh rollout's behaviour logprobs, so importance weights are 1), the KL to the reference stays
    raw, and PPO updates stay finite (prompt positions hold tokens outside the kept set)."""
    config = _config(run_dir, temperature=0.7, top_k=5, logprobs_mode="processed", ppo_epochs=1,
                     output_dir=str(run_dir / "ppo_processed"))
    models = load_models(config)
    tok = models.tokenizer
    prompts = [tok(f"Once upon a time, {n} had a {t}.").input_ids for n, t in zip(NAMES, THINGS)]
    params = SamplingParams(max_new_tokens=16, seed=0, temperature=0.7, top_k=5, logprobs_mode="processed")
    rollouts = LocalRolloutSource(models.actor, tok).generate(prompts, params)
    trainer = PPOTrainer(config, models.actor, models.critic, models.reference, models.reward, tok.pad_token_id)
    exp = trainer.make_experience(rollouts)
    mask = exp.action_mask
    assert pm.sequence_kl(exp.logprobs, exp.ref_logprobs, mask).abs().max().item() < 1e-5   # raw, actor == reference
    torch.testing.assert_close(exp.behaviour_logprobs * mask, exp.ratio_logprobs, atol=2e-4, rtol=0)
    assert ((exp.ratio_logprobs - exp.logprobs) * mask).abs().max().item() > 0.05     # processed, not raw
    remote = PPOTrainer(dataclasses.replace(config, rollout="remote", server="127.0.0.1:1"), models.actor,
                        models.critic, models.reference, models.reward, tok.pad_token_id)
    remote.fresh_version = rollouts[0].weight_version     # fresh, yet processed ratios need the actor's raw forward
    assert torch.equal(remote.make_experience(rollouts).logprobs, exp.logprobs)
    weights, _ = remote.importance_weights(exp)
    torch.testing.assert_close(weights, torch.ones_like(weights), atol=5e-4, rtol=0)
    stats = trainer.train_on(exp)
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["clip_fraction"] < 1.0


def test_run_ppo_with_lora_ema_ptx_saves_loadable_checkpoints_and_resumes(run_dir):
    config = _config(run_dir, iterations=2, ema_decay=0.5, ptx_coef=0.5, ptx_data=[f"text:{run_dir / 'stories.txt'}"],
                     lora=LoraOptions(lora_dim=4, only_optimize_lora=True), output_dir=str(run_dir / "ppo_lora"))
    result = run_ppo(config)
    assert result["iterations"] == 2 and math.isfinite(result["kl"]) and "ptx_loss" in result
    rows = [json.loads(line) for line in open(run_dir / "ppo_lora" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_score", "kl", "actor_loss", "critic_loss", "clip_fraction", "response_length",
                "samples_per_s", "tokens_per_s"):
        assert key in rows[-1], key
    # the first batch is sampled from the reference policy: KL 0 up to the rounding between generate's cached
    # decode (whose logprobs are the old policy's for fresh rollouts) and a full forward
    assert rows[0]["kl"] == pytest.approx(0.0, abs=2e-2)

    loaded = {}
    for name in ("actor", "actor_ema"):
        model, info = AutoModelForCausalLM.from_pretrained(result["checkpoint" if name == "actor" else "ema_checkpoint"],
                                                           output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        loaded[name] = model.state_dict()
    reference = AutoModelForCausalLM.from_pretrained(str(run_dir / "sft")).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    moved = (loaded["actor"][key] - reference[key]).abs().max()
    assert moved > 0, "the fused LoRA update must reach the exported weights"
    # the EMA (decay 0.5, two updates) sits strictly between the reference and the actor
    ema_moved = (loaded["actor_ema"][key] - reference[key]).abs().max()
    assert 0 < ema_moved < moved
    assert modeling.ValueModel.from_pretrained(result["critic_checkpoint"]) is not None

    resumed = run_ppo(_config(run_dir, iterations=3, ema_decay=0.5, ptx_coef=0.5, resume=True,
                              ptx_data=[f"text:{run_dir / 'stories.txt'}"], output_dir=str(run_dir / "ppo_lora"),
                              lora=LoraOptions(lora_dim=4, only_optimize_lora=True)))
    rows = [json.loads(line) for line in open(run_dir / "ppo_lora" / "metrics.jsonl")]
    assert resumed["iterations"] == 3 and [r["step"] for r in rows] == [1, 2, 3]


def test_missing_step_outputs_name_the_field(tmp_path):
    config = PPOConfig(output_dir=str(tmp_path / "ppo"))
    with pytest.raises(ConfigError) as err:
        run_ppo(config)
    assert err.value.field == "actor_model"


def test_update_threads_apply_inside_the_update_and_are_restored():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with torch_threads(0):                              # 0: the process's own
        assert torch.get_num_threads() == before
    with pytest.raises(ConfigError) as err:
        PPOConfig(update_threads=-1).validate()
    assert err.value.field == "update_threads"


@pytest.mark.slow
def test_two_rank_zero3_ppo_under_the_deepspeed_launcher(run_dir):
    """Two ranks sample different responses (lengths differ), yet generation, ZeRO-3 gathers and EMA stay in step."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_dir / "ppo_2rank"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "--module", "learner", "ppo", "--data", f"dschat:{run_dir / 'prompts.jsonl'}", "--data_split", "0,0,1",
           "--output_dir", str(out), "--iterations", "2", "--rollout_batch_size", "4", "--mini_batch_size", "2",
           "--max_new_tokens", "12", "--ema_decay", "0.5", "--zero_stage", "3", "--frozen_dtype", "float32",
           "--cache_dir", str(run_dir / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"step": "ppo"')][-1])
    assert final["iterations"] == 2
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl"] == pytest.approx(0.0, abs=2e-2)
    for folder in ("actor", "actor_ema"):
        _, info = AutoModelForCausalLM.from_pretrained(str(out / folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.slow
def test_learn_ppo_rollout_remote_against_a_running_server(run_dir, tmp_path):
    """`tandem learn ppo --rollout remote --server HOST:PORT`: the starting actor is pushed, every rollout
    comes from the server, and the actor is pushed back after every iteration; all of it over TLS."""
    import subprocess
    import sys

    from clients.client import TandemClient
    from protos.auth import ServerTLS, channel_credentials
    from serving.engine.config import EngineConfig
    from serving.rpc.server import ServerConfig, start_server
    from tests.tls_certs import make_certs

    token_file = tmp_path / "token"
    token_file.write_text("ppo-remote-token")
    certs = make_certs(tmp_path / "certs")
    server = start_server(EngineConfig(model=str(run_dir / "sft"), device="cpu", num_kv_blocks=256),
                          ServerConfig(port=0, push_token_file=str(token_file),
                                       tls=ServerTLS(str(certs.server_cert), str(certs.server_key))))
    tls = channel_credentials(certs.ca)
    try:
        with TandemClient(server.address, credentials=tls) as client:
            before = client.status().weight_version
        out = tmp_path / "ppo_remote"
        cmd = [sys.executable, "-m", "cli.main", "learn", "ppo", "--num-ranks", "1",
               "--actor_model", str(run_dir / "sft"), "--critic_model", str(run_dir / "reward"),
               "--reward_model", str(run_dir / "reward"), "--tokenizer", str(run_dir / "sft"),
               "--data", f"dschat:{run_dir / 'prompts.jsonl'}", "--data_split", "0,0,1",
               "--output_dir", str(out), "--iterations", "3", "--rollout_batch_size", "4",
               "--mini_batch_size", "2", "--max_new_tokens", "12", "--zero_stage", "0",
               "--cache_dir", str(run_dir / "cache"), "--rollout", "remote", "--server", server.address,
               "--push_weights", "true", "--push_token_file", str(token_file), "--server_tls_ca", str(certs.ca)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        final = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"step": "ppo"')][-1])
        assert final["first_version"] == before + 1                 # the starting actor, pushed first
        assert final["final_version"] == before + 4                 # then once after each of 3 iterations
        assert [p["version"] for p in final["pushes"]] == [before + 2, before + 3, before + 4]
        assert final["rollout"]["rollout_fresh"] + final["rollout"].get("rollout_stale", 0) == 3 * 4
        with TandemClient(server.address, credentials=tls) as client:
            status = client.status()
        assert status.weight_version == before + 4 and "ppo iteration 3" in status.weight_origin
    finally:
        server.stop(grace=1.0)
@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce++"])
def test_critic_free_algorithms_share_lora_ema_ptx_and_train_no_critic(run_dir, algo):
    out = run_dir / f"ppo_{algo}"
    config = _config(run_dir, algo=algo, iterations=2, rollout_batch_size=2, samples_per_prompt=4,
                     cliprange_high=0.28, ema_decay=0.5, ptx_coef=0.5, ptx_data=[f"text:{run_dir / 'stories.txt'}"],
                     lora=LoraOptions(lora_dim=4, only_optimize_lora=True), output_dir=str(out))
    models = load_models(config)
    assert models.critic is None                           # nothing of a critic is loaded
    tok = models.tokenizer
    prompts = [tok(f"Once upon a time, {n} had a {t}.").input_ids for n, t in zip(NAMES[:2], THINGS[:2])]
    rollouts = LocalRolloutSource(models.actor, tok).generate(prompts, SamplingParams(max_new_tokens=16, seed=0), 4)
    assert [r.prompt_ids for r in rollouts] == [p for p in prompts for _ in range(4)]   # prompt-major groups
    trainer = PPOTrainer(config, models.actor, None, models.reference, models.reward, tok.pad_token_id)
    exp = trainer.make_experience(rollouts)
    mask = exp.action_mask.bool()
    if algo in ("grpo", "rloo"):           # one advantage per response, centred within its prompt's group
        per_row = torch.stack([exp.advantages[i][mask[i]][0] for i in range(len(exp))])
        for i in range(len(exp)):
            assert torch.allclose(exp.advantages[i][mask[i]], per_row[i].expand(int(mask[i].sum())))
        assert torch.allclose(per_row.view(2, 4).sum(1), torch.zeros(2), atol=1e-4)
    else:                                  # whitened over the whole batch
        assert abs(exp.advantages[mask].mean().item()) < 1e-4
    del models, trainer

    result = run_ppo(config)
    assert result["algo"] == algo and result["samples_per_prompt"] == 4 and "ptx_loss" in result
    assert "critic_checkpoint" not in result and not (out / "critic").exists()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and "critic_loss" not in rows[-1] and "actor_loss" in rows[-1]
    assert ("kl_loss" in rows[-1]) == (algo == "grpo")
    for name in ("checkpoint", "ema_checkpoint"):
        _, info = AutoModelForCausalLM.from_pretrained(result[name], output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_group_algorithms_refuse_one_sample_per_prompt(run_dir):
    with pytest.raises(ConfigError) as err:
        _config(run_dir, algo="rloo", samples_per_prompt=1)
    assert err.value.field == "samples_per_prompt"
    with pytest.raises(ConfigError) as err:
        _config(run_dir, algo="dpo")
    assert err.value.field == "algo"


def test_a_response_cut_before_its_eos_pays_the_missing_eos_penalty(run_dir):
    config = _config(run_dir, missing_eos_penalty=3.0)
    models = load_models(config)
    tok = models.tokenizer
    prompts = [tok(f"Once upon a time, {n} had a {t}.").input_ids for n, t in zip(NAMES, THINGS)]
    rollouts = LocalRolloutSource(models.actor, tok).generate(prompts, SamplingParams(max_new_tokens=3, seed=1))
    rollouts[0].finish_reason = "stop"                     # one that ended, whatever generate did
    cut = torch.tensor([r.finish_reason != "stop" for r in rollouts], dtype=torch.float32)
    assert 0 < cut.sum() < len(rollouts)
    trainer = PPOTrainer(config, models.actor, models.critic, models.reference, models.reward, tok.pad_token_id)
    exp = trainer.make_experience(rollouts)
    torch.testing.assert_close(exp.score, exp.raw_score - 3.0 * cut)


def test_the_fast_experience_equals_the_full_one(run_dir):
    """Issue 11's levers against the plain experience on the same rollouts: length-sorted chunks cut to their
    own prompts and response-only logits change nothing beyond float rounding; reusing fresh rollouts'
    behaviour logprobs skips the actor's forward (its logprobs are generate's, exactly); bf16 frozen models
    stay within bf16 rounding of fp32 ones."""
    config = _config(run_dir, reuse_rollout_logprobs=False, sort_chunk_rows=0)
    models = load_models(config)
    tok = models.tokenizer
    prompts = [tok(f"Once upon a time, {n} had a {t}." + " Then" * i).input_ids
               for i, (n, t) in enumerate(zip(NAMES, THINGS))] + [[1, 4, 5]]
    rollouts = LocalRolloutSource(models.actor, tok).generate(prompts, SamplingParams(max_new_tokens=12, seed=3))
    for r in rollouts:
        r.weight_version = 7
    plain = PPOTrainer(config, models.actor, models.critic, models.reference, models.reward, tok.pad_token_id)
    full = plain.make_experience(rollouts)
    assert plain.last_fresh == 0.0

    sorted_config = dataclasses.replace(config, sort_chunk_rows=2)
    chunked = PPOTrainer(sorted_config, models.actor, models.critic, models.reference, models.reward,
                         tok.pad_token_id).make_experience(rollouts)
    for name in ("logprobs", "ref_logprobs", "values", "raw_score", "advantages", "returns"):
        torch.testing.assert_close(getattr(chunked, name), getattr(full, name), atol=2e-5, rtol=0, msg=name)

    reuse = PPOTrainer(dataclasses.replace(sorted_config, reuse_rollout_logprobs=True), models.actor, models.critic,
                       models.reference, models.reward, tok.pad_token_id)
    reuse.fresh_version = 7
    calls = []
    hook = ds_unwrap(models.actor).register_forward_hook(lambda *a: calls.append(1))
    try:
        fresh = reuse.make_experience(rollouts)
        assert calls == [] and reuse.last_fresh == 1.0          # no actor forward for fresh rows
        torch.testing.assert_close(fresh.logprobs, fresh.behaviour_logprobs * fresh.action_mask, atol=0, rtol=0)
        torch.testing.assert_close(fresh.logprobs, full.logprobs, atol=2e-4, rtol=0)
        rollouts[0].weight_version = 6                          # one stale row: only it is recomputed
        mixed = reuse.make_experience(rollouts)
        assert len(calls) == 1 and reuse.last_fresh == pytest.approx(1 - 1 / len(rollouts))
        torch.testing.assert_close(mixed.logprobs[0], full.logprobs[0], atol=2e-5, rtol=0)
    finally:
        hook.remove()

    bf16 = load_models(dataclasses.replace(config, frozen_dtype="bfloat16"))
    assert next(ds_unwrap(bf16.reference).parameters()).dtype == torch.bfloat16
    auto = load_models(dataclasses.replace(config, frozen_dtype="auto"))     # bf16 only where it is native
    assert next(ds_unwrap(auto.reward).parameters()).dtype == (torch.bfloat16 if ds.fast_bf16() else torch.float32)
    half = PPOTrainer(config, models.actor, models.critic, bf16.reference, bf16.reward,
                      tok.pad_token_id).make_experience(rollouts)
    token_error = ((half.ref_logprobs - full.ref_logprobs).abs() * full.action_mask).sum() / full.action_mask.sum()
    assert 0 < token_error < 0.05, token_error
    assert (half.raw_score - full.raw_score).abs().max() < 0.05 * full.raw_score.abs().max() + 1e-3


@pytest.mark.parametrize("fused_fields", [("values_in_update",), ("logprobs_in_update",),
                                          ("values_in_update", "logprobs_in_update")])
def test_old_figures_from_the_update_forwards_train_exactly_as_experience_forwards(run_dir, fused_fields):
    """One PPO epoch over one minibatch (DeepSpeed-Chat's setting): the critic's old values and the actor's old
    logprobs come from their update forwards, one forward fewer each; the values, logprobs, advantages and the
    updated actor and critic are those of the plain path (float rounding apart)."""
    plain_config = _config(run_dir, ppo_epochs=1, mini_batch_size=8, values_in_update=False,
                           logprobs_in_update=False, deepspeed=DeepSpeedOptions(zero_stage=0))
    fused_config = dataclasses.replace(plain_config, **{f: True for f in fused_fields})
    fused_values, fused_logprobs = "values_in_update" in fused_fields, "logprobs_in_update" in fused_fields
    runs = {}
    for name, config in (("plain", plain_config), ("fused", fused_config)):
        models = load_models(config)
        tok = models.tokenizer
        prompts = [tok(f"Once upon a time, {n} had a {t}.").input_ids for n, t in zip(NAMES, THINGS)] + [[1, 4, 5]]
        rollouts = LocalRolloutSource(models.actor, tok).generate(prompts, SamplingParams(max_new_tokens=12, seed=3))
        trainer = PPOTrainer(config, models.actor, models.critic, models.reference, models.reward, tok.pad_token_id)
        calls = {"critic": [], "actor": []}
        hooks = [ds_unwrap(getattr(models, m)).register_forward_hook(lambda *a, c=c: c.append(1))
                 for m, c in calls.items()]
        try:
            exp = trainer.make_experience(rollouts)
            experience_calls = {m: len(c) for m, c in calls.items()}
            assert exp.values_pending == (name == "fused" and fused_values)
            assert exp.logprobs_pending == (name == "fused" and fused_logprobs)
            stats = trainer.train_on(exp)
        finally:
            for hook in hooks:
                hook.remove()
        # no experience forward of their own where fused; one update forward each
        assert (experience_calls["critic"] == 0) == (name == "fused" and fused_values)
        assert (experience_calls["actor"] == 0) == (name == "fused" and fused_logprobs)
        assert {m: len(c) - experience_calls[m] for m, c in calls.items()} == {"critic": 1, "actor": 1}
        assert not exp.pending and exp.returns.abs().sum() > 0 and exp.logprobs.abs().sum() > 0
        if name == "fused" and fused_logprobs:      # an actor that drops out in train mode keeps its own forward
            ds_unwrap(models.actor).config.attention_dropout = 0.1
            dropping = PPOTrainer(config, models.actor, models.critic, models.reference, models.reward, tok.pad_token_id)
            assert not dropping.logprobs_in_update(len(rollouts)) and trainer.logprobs_in_update(len(rollouts))
            ds_unwrap(models.actor).config.attention_dropout = 0.0
        runs[name] = (exp, stats, {k: v.detach().clone() for k, v in ds_unwrap(models.critic).state_dict().items()},
                      {k: v.detach().clone() for k, v in ds_unwrap(models.actor).state_dict().items()})
    (plain, plain_stats, plain_critic, plain_actor), (fused, fused_stats, fused_critic, fused_actor) = runs.values()
    for name in ("values", "logprobs", "ratio_logprobs", "rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), atol=1e-5, rtol=0, msg=name)
    assert fused_stats["critic_loss"] == pytest.approx(plain_stats["critic_loss"], rel=1e-4)
    for weights_f, weights_p in ((fused_critic, plain_critic), (fused_actor, plain_actor)):
        for key in weights_p:
            torch.testing.assert_close(weights_f[key], weights_p[key], atol=1e-5, rtol=0, msg=key)


def test_update_phases_take_update_threads_only_while_the_server_is_idle(run_dir):
    """update_threads is for a learner sharing cores with its server: each update phase (a forward, or a backward
    and step) takes them only when the server is not generating for it at the phase's start."""
    config = _config(run_dir, ppo_epochs=1, mini_batch_size=8, update_threads=2,
                     deepspeed=DeepSpeedOptions(zero_stage=0))
    models = load_models(config)
    tok = models.tokenizer
    prompts = [tok(f"Once upon a time, {n} had a {t}.").input_ids for n, t in zip(NAMES, THINGS)]
    rollouts = LocalRolloutSource(models.actor, tok).generate(prompts, SamplingParams(max_new_tokens=8, seed=3))
    trainer = PPOTrainer(config, models.actor, models.critic, models.reference, models.reward, tok.pad_token_id)
    seen = []
    hooks = [ds_unwrap(m).register_forward_hook(lambda *a, name=name: seen.append((name, torch.get_num_threads())))
             for name, m in (("actor", models.actor), ("critic", models.critic))]
    busy = iter([True, False, False, False])        # actor forward, critic forward, its backward, actor update
    trainer.server_busy = lambda: next(busy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        trainer.train_on(trainer.make_experience(rollouts))
        assert torch.get_num_threads() == 1         # restored after each phase
    finally:
        torch.set_num_threads(before)
        for hook in hooks:
            hook.remove()
    assert seen == [("actor", 1), ("critic", 2)]
    assert next(busy, "spent") == "spent"           # asked once per phase
