"""Resume is correct: a PPO run interrupted after a checkpoint and resumed from it goes on exactly as the
uninterrupted run (iteration count, prompts, samples, KL controller, reward normalisation, EMA, optimizer),
and with remote rollouts it pushes the resumed actor before its first rollout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.errors import ConfigError
from learner.ppo.step import run_ppo


class Interrupted(Exception):
    """What kills the run in the middle (a crash, a pre-empted job)."""


def _interrupt_at(iteration: int):
    def hook(i, models, stats) -> None:
        if i == iteration:
            raise Interrupted(f"after iteration {i}")
    return hook


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def _optimizer_state(engine) -> list[tuple[str, float]]:
    """A fingerprint of the actor's Adam state (ZeRO-3 wraps torch's AdamW: its state is per partition)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out = []
    for group in inner.param_groups:
        for param in group["params"]:
            for key, value in sorted(inner.state.get(param, {}).items()):
                if torch.is_tensor(value):
                    out.append((key, value.double().abs().sum().item()))
    return out


def test_the_prompt_stream_resumes_at_its_position(ppo_run):
    from learner.data import PromptDataset
    from learner.inputs import step_samples
    from learner.modeling import load_tokenizer
    from learner.rollout.prompts import PromptStream

    config = ppo_run.config("prompts")
    dataset = PromptDataset(step_samples(config, "ppo")[0], load_tokenizer(ppo_run.root / "sft"), 128,
                            ppo_run.root / "cache")
    whole = PromptStream(dataset, 5, seed=3)
    batches = [whole.next_batch().ids for _ in range(12)]          # several epochs of the seeded order
    cut = PromptStream(dataset, 5, seed=3)
    for _ in range(7):
        cut.next_batch()
    cut.peek()                                                     # peeked (a remote prefetch), not taken
    state = cut.state_dict()
    assert state["batches_taken"] == 7
    again = PromptStream(dataset, 5, seed=3)
    again.load_state_dict(state)
    assert [again.next_batch().ids for _ in range(5)] == batches[7:]
    with pytest.raises(ConfigError) as err:
        PromptStream(dataset, 4, seed=3).load_state_dict(state)
    assert err.value.field == "rollout_batch_size"


@pytest.mark.slow
def test_an_interrupted_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(ppo_run):
    # ZeRO-3 on one CPU rank, local HF-generate rollouts, an EMA, the adaptive KL controller and reward
    # normalisation: everything a resume has to restore. On CPU every part is deterministic given its state
    # (sampling draws from the torch RNG, minibatches from the trainer's generator, DeepSpeed's fp32 Adam has no
    # randomness), so the resumed run must reproduce the uninterrupted one, not merely come close: the same
    # prompts (their reward scores and response lengths per iteration), the same KL coefficient, the same
    # optimizer moments and, at the end, the same actor, critic and EMA weights. A resume that lost any one of
    # these (the prompts restarting from the first batch, a fresh Adam, the EMA restarting from the actor, the
    # RNG reseeded) breaks the equalities below.
    settings = dict(iterations=4, ema_decay=0.5, adaptive_kl=True, target_kl=0.01, normalize_reward=True,
                    deepspeed={"zero_stage": 3})
    seen: dict[str, dict[int, dict]] = {"whole": {}, "resumed": {}}

    def record(name: str):
        def hook(i, models, stats) -> None:
            seen[name][i] = {"optimizer": _optimizer_state(models.actor), "steps": models.actor.global_steps}
        return hook

    whole = run_ppo(ppo_run.config("whole", **settings), after_iteration=record("whole"))
    with pytest.raises(Interrupted):         # saved after iteration 2; iteration 3's work is lost
        run_ppo(ppo_run.config("cut", save_every=2, **settings), after_iteration=_interrupt_at(3))
    resumed = run_ppo(ppo_run.config("cut", save_every=2, resume=True, **settings), after_iteration=record("resumed"))

    assert resumed["iterations"] == whole["iterations"] == 4
    assert sorted(seen["resumed"]) == [3, 4]                      # it went on from the checkpoint's iteration
    rows = _rows(ppo_run.root / "cut")
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4]            # the lost iteration 3, then the resumed run
    for mine, theirs in zip(rows[3:], _rows(ppo_run.root / "whole")[2:]):
        for key in ("reward_score", "response_length", "kl", "kl_coef", "actor_loss", "critic_loss"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (mine["step"], key)
    assert seen["resumed"][4]["steps"] == seen["whole"][4]["steps"]
    for (key, mine), (_, theirs) in zip(seen["resumed"][4]["optimizer"], seen["whole"][4]["optimizer"], strict=True):
        assert mine == pytest.approx(theirs, rel=1e-5), key
    for name in ("checkpoint", "critic_checkpoint", "ema_checkpoint"):
        files = ["model.safetensors"] + (["value_head.safetensors"] if name == "critic_checkpoint" else [])
        for file in files:
            a, b = load_file(f"{resumed[name]}/{file}"), load_file(f"{whole[name]}/{file}")
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=f"{name}/{file}: {key}")


@pytest.mark.slow
def test_a_resumed_remote_run_pushes_the_resumed_actor_before_its_first_rollout(ppo_run, tmp_path):
    from clients.client import TandemClient
    from serving.engine.config import EngineConfig
    from serving.rpc.server import ServerConfig, start_server

    token_file = tmp_path / "token"
    token_file.write_text("resume-token")
    server = start_server(EngineConfig(model=str(ppo_run.root / "sft"), device="cpu", num_kv_blocks=256),
                          ServerConfig(port=0, push_token_file=str(token_file)))
    config = ppo_run.config("remote_cut", rollout="remote", server=server.address, push_weights=True,
                            push_token_file=str(token_file), iterations=4, save_every=2, max_staleness=1)
    try:
        with pytest.raises(Interrupted):      # after iteration 3's push: the server serves weights now lost
            run_ppo(config, after_iteration=_interrupt_at(3))
        with TandemClient(server.address) as client:
            lost = client.status(timeout=10)
        assert "ppo iteration 3" in lost.weight_origin
        resumed = run_ppo(ppo_run.config("remote_cut", rollout="remote", server=server.address, push_weights=True,
                                         push_token_file=str(token_file), iterations=4, save_every=2,
                                         max_staleness=1, resume=True))
    finally:
        server.stop(grace=1.0)
    # the resumed actor went out first, above every version the server ever served
    assert resumed["first_version"] == lost.weight_version + 1
    assert [p["version"] for p in resumed["pushes"]] == [lost.weight_version + 2, lost.weight_version + 3]
    # ... and the first rollout was sampled with it: every sample fresh, and the server's behaviour logprobs
    # equal the learner's own under the resumed weights (importance ratio 1). Had the server still served the
    # lost iteration-3 weights (or the SFT start), these samples would be off-policy, as the stale ones of
    # iteration 4 are (sampled by the resumed actor, trained on after one more update).
    resumed_rows = [r for r in _rows(ppo_run.root / "remote_cut") if r["step"] >= 3][-2:]
    third, fourth = resumed_rows
    assert third["step"] == 3 and fourth["step"] == 4
    assert third["is_ratio_max"] == pytest.approx(1.0, abs=1e-3)
    assert third["is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    totals = resumed["rollout"]
    assert totals["rollout_dropped"] == 0 and totals["rollout_fresh"] + totals["rollout_stale"] == 8
    assert totals["rollout_fresh"] >= 4                             # iteration 3's batch, at least
    if totals["rollout_stale"]:        # iteration 4's prefetched batch: made before the push, one update behind
        assert fourth["is_ratio_max"] > 1.01                        # what weights other than the learner's show
