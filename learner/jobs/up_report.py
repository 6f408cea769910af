"""What `tandem up` shows at the end: figures gathered from the learner, the live server and the metrics.

The served model is checked, not assumed: the version in force must be the last one pushed, and the
gold score of its greedy responses on the gold judge's eval prompts (over gRPC) is reported beside the learner's.
Data with no gold judge (real data) is scored by the learned reward model instead, and the report says so
(learner.jobs.up_reward).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from learner.metrics import read_metrics
from learner.ppo.gold import DEFAULT_EVAL_PROMPTS

log = logging.getLogger(__name__)

CURVE_POINTS = 10


def served_gold(client, model: str, seed: int, max_prompt_len: int, max_new_tokens: int) -> tuple[float, list]:
    """Mean gold score of the server's greedy responses to the gold judge's eval prompts, and the completions."""
    from learner.modeling import load_tokenizer
    from learner.task import eval_prompts, gold_score

    tokenizer = load_tokenizer(model)
    prompts = eval_prompts(DEFAULT_EVAL_PROMPTS, seed)
    ids = [tokenizer(p).input_ids[-max_prompt_len:] for p in prompts]
    completions = client.generate(ids, temperature=0, max_new_tokens=max_new_tokens, timeout=120)
    scores = [gold_score(p, c.text) for p, c in zip(prompts, completions)]
    return sum(scores) / len(scores), list(zip(prompts, completions))


def sampled_gold(address: str, model: str, run_dir: Path, learned: dict) -> dict[str, float]:
    """The policy PPO optimises, as a user of a sampling server sees it: mean gold of temperature-1 samples
    (4 per eval prompt) of the SFT and PPO checkpoints (HF, in this process) and of the served model."""
    from learner.modeling import load_tokenizer
    from learner.rollout.local import SamplingParams
    from learner.rollout.remote import RemoteRolloutSource
    from learner.task import eval_prompts, gold_score
    from learner.task.evaluate import gold_of_checkpoint

    seed, new = learned["seed"], learned["max_new_tokens"]
    out = {"gold_sampled_before": gold_of_checkpoint(run_dir / "sft", max_new_tokens=new, seed=seed),
           "gold_sampled_after": gold_of_checkpoint(learned["checkpoint"], max_new_tokens=new, seed=seed)}
    tokenizer = load_tokenizer(model)
    prompts = eval_prompts(DEFAULT_EVAL_PROMPTS, seed)
    ids = [tokenizer(p).input_ids[-learned["max_prompt_len"]:] for p in prompts]
    with RemoteRolloutSource(address, max_staleness=0) as source:
        rollouts = source.rollout(ids, SamplingParams(max_new_tokens=new, temperature=1.0, seed=seed), 4)
    texts = [p for p in prompts for _ in range(4)]
    out["gold_sampled_served"] = sum(gold_score(p, r.text) for p, r in zip(texts, rollouts)) / len(texts)
    return out


def side_by_side(client, model: str, run_dir: Path, learned: dict, gold_data: bool) -> list[dict]:
    """The SFT checkpoint's greedy answers (HF, here) and the served model's (over gRPC) to a few fixed
    prompts no training sample asks, with their gold scores on the embedded task."""
    from learner.modeling import load_tokenizer
    from learner.task import gold_score, greedy_answers, showcase_prompts

    prompts = showcase_prompts() if gold_data else ["Once upon a time"]
    new = learned["max_new_tokens"]
    sft = greedy_answers(run_dir / "sft", prompts, new)
    tokenizer = load_tokenizer(model)
    ids = [tokenizer(p).input_ids[-learned["max_prompt_len"]:] for p in prompts]
    served = client.generate(ids, temperature=0, max_new_tokens=new, timeout=60)
    rows = []
    for prompt, before, after in zip(prompts, sft, served):
        rows.append({"prompt": prompt, "sft": before.strip(), "served": after.text.strip(),
                     "weight_version": after.weight_version,
                     "sft_gold": gold_score(prompt, before) if gold_data else None,
                     "served_gold": gold_score(prompt, after.text) if gold_data else None})
    return rows


def reward_curve(run_dir: Path) -> list[dict]:
    path = run_dir / "ppo" / "metrics.jsonl"
    if not path.is_file():
        return []
    keys = ("reward_score", "gold_score", "kl")
    return [{"iteration": row["step"], **{k: row[k] for k in keys if row.get(k) is not None}}
            for row in read_metrics(path) if row.get("reward_score") is not None]


def _curve_lines(curve: list[dict]) -> list[str]:
    stride = max(1, -(-len(curve) // CURVE_POINTS))
    shown = curve[::stride] + ([curve[-1]] if curve and (len(curve) - 1) % stride else [])
    lines = []
    for row in shown:
        gold = f"  gold {row['gold_score']:5.1f}" if "gold_score" in row else ""
        lines.append(f"    iter {row['iteration']:3d}  reward {row['reward_score']:+.3f}{gold}  kl {row.get('kl', 0):.3f}")
    return lines


def finish(config, learned: dict, address: str, model: str, times: dict, began: float) -> dict:
    """Query the live server, draw the plots, print the figures; the summary dict."""
    from clients.client import TandemClient
    from learner.jobs.up_reward import NO_GOLD, reward_report
    from learner.plot import plot_run, plot_story
    from learner.ppo.gold import has_gold_judge

    run_dir = Path(config.run_dir).resolve()
    gold_data = learned.get("gold_judge", has_gold_judge(config.data or ["embedded"]))
    served, rewards = None, {}
    with TandemClient(address, timeout=60) as client:
        status = client.status()
        if status.weight_version != learned["final_version"]:
            raise RuntimeError(f"the server serves v{status.weight_version}, not the last pushed "
                               f"v{learned['final_version']}")
        t = time.perf_counter()
        if gold_data:
            served, _ = served_gold(client, model, learned["seed"], learned["max_prompt_len"],
                                    learned["max_new_tokens"])
            t = time.perf_counter()
            shown = side_by_side(client, model, run_dir, learned, gold_data)
        else:                             # the reward model's score of greedy answers to held-out prompts
            rewards, shown = reward_report(address, model, run_dir, learned)
        shown_s = time.perf_counter() - t
    sampled = sampled_gold(address, model, run_dir, learned) if gold_data else {}
    curve = reward_curve(run_dir)
    story, plots = None, []
    try:
        algo = learned.get("algo", "ppo")
        held = (rewards["reward_before"], rewards["reward_after"]) if rewards.get("reward_before") is not None else None
        story = plot_story(run_dir / "ppo" / "metrics.jsonl", run_dir / "story.png",
                           f"tandem up ({algo}, seed {learned['seed']}): served v{learned['final_version']}",
                           reward_eval=held)
        plots = [str(p) for p in plot_run(run_dir)]       # every metric of every step: the full grid
    except Exception as err:  # noqa: BLE001 - the figures matter more than the pictures
        log.warning("plotting failed: %s", err)
    pushes = len(learned["push_s"])
    stage_s = {**{k: round(v, 2) for k, v in times.items()}, **{k: round(v, 2) for k, v in learned["times"].items()},
               "total_s": round(time.perf_counter() - began, 2)}
    summary = {
        "gold_judge": gold_data, "score": "gold judge" if gold_data else "reward model",
        "note": None if gold_data else NO_GOLD,
        "gold_before": learned["gold_before"], "gold_after": learned["gold_after"],
        "gold_gain": (learned["gold_after"] - learned["gold_before"]) if gold_data else None,
        "gold_after_served": served, **sampled, **rewards, "reward_accuracy": learned["reward_accuracy"],
        "reward_accuracy_before": learned.get("reward_accuracy_before"),
        "reward_eval_pairs": learned.get("reward_eval_pairs"), "kl": learned["kl"],
        "ppo_iterations": learned["ppo_iterations"], "weight_versions_pushed": learned["versions_pushed"],
        "served_version": status.weight_version, "served_origin": status.weight_origin,
        "bytes_pushed": learned["bytes_pushed"], "push_encoding": learned["push_encoding"],
        "tensors_per_push": learned["tensors_per_push"],
        "push_s_mean": sum(learned["push_s"]) / pushes if pushes else 0.0,
        "swap_ms_mean": 1e3 * sum(learned["swap_s"]) / pushes if pushes else 0.0,
        "swap_ms_max": 1e3 * max(learned["swap_s"], default=0.0),
        "stage_s_mean": sum(learned["stage_s"]) / pushes if pushes else 0.0,
        "rollout": learned["rollout"], "max_staleness": config.max_staleness,
        "ranks": learned.get("ranks", config.ranks), "zero_stage": learned.get("zero_stage"),
        "zero_stages": learned.get("zero_stages"), "rank_reports": learned.get("rank_reports", []),
        "launcher": "deepspeed" if learned.get("ranks", config.ranks) > 1 else "single process",
        "stage_wall_s": stage_s, "reward_curve": curve, "story_plot": str(story) if story else None, "plots": plots,
        "side_by_side": shown, "side_by_side_s": round(shown_s, 3), "algo": learned.get("algo", "ppo"),
        "samples_per_prompt": learned.get("samples_per_prompt", 1), "rl_samples_per_s": learned.get("rl_samples_per_s"),
        "checkpoint": learned["checkpoint"], "model": model, "run_dir": str(run_dir),
    }
    print_summary(summary)
    return summary


def _side_by_side_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    if rows[0].get("sft_reward") is not None:
        return _reward_side_by_side_lines(rows)
    version = rows[0]["weight_version"]
    width = max(len(r["sft"]) for r in rows) + 8
    qwidth = max(len(r["prompt"].removeprefix("human : ").removesuffix(" ? assistant :")) for r in rows)
    lines = [f"  greedy answers to prompts no training sample asks (gold score): SFT model -> served model (v{version})"]
    for r in rows:
        question = r["prompt"].removeprefix("human : ").removesuffix(" ? assistant :")
        before = r["sft"] + (f"  ({r['sft_gold']:.0f})" if r["sft_gold"] is not None else "")
        after = r["served"] + (f"  ({r['served_gold']:.0f})" if r["served_gold"] is not None else "")
        lines.append(f"    {question:<{qwidth}}  {before:<{width}} -> {after}")
    return lines


def _reward_side_by_side_lines(rows: list[dict]) -> list[str]:
    """Dialogue prompts are long: the last human turn, then each answer on its own line with its reward score."""
    from learner.jobs.up_reward import clip, last_question

    lines = [f"  greedy answers to held-out prompts (reward model score, no gold judge): SFT model, served model "
             f"(v{rows[0]['weight_version']})"]
    for r in rows:
        lines += [f"    Human: {last_question(r['prompt'], 90)}",
                  f"      SFT    ({r['sft_reward']:+.3f}): {clip(r['sft'], 90)}",
                  f"      served ({r['served_reward']:+.3f}): {clip(r['served'], 90)}"]
    return lines


def _fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def _score_lines(s: dict) -> list[str]:
    """What the run is judged by: the gold judge (the embedded task) or, with none, the reward model."""
    algo = s.get("algo", "ppo").upper()
    accuracy = f"reward model held-out accuracy: {_fmt(s['reward_accuracy'], '.3f')}"
    if not s.get("gold_judge", True):
        before = s.get("reward_accuracy_before")
        accuracy = (f"reward model held-out pairwise accuracy: {_fmt(before, '.3f')} before training -> "
                    f"{_fmt(s['reward_accuracy'], '.3f')} after ({s.get('reward_eval_pairs') or 0} pairs)")
        return [
            f"  {s['note']}",
            f"  reward model score (greedy, {s.get('reward_eval_prompts', 0)} held-out prompts): before {algo} "
            f"{_fmt(s.get('reward_before'), '+.3f')} -> after {algo} {_fmt(s.get('reward_after'), '+.3f')} "
            f"(served model: {_fmt(s.get('reward_after_served'), '+.3f')})",
            f"  {accuracy}   KL to reference: {_fmt(s['kl'], '.3f')}",
            f"  reward curve ({s['ppo_iterations']} {s['algo']} iterations; the reward model's score of the sampled "
            f"rollouts, and the KL; no gold judge to set beside it):", *_curve_lines(s["reward_curve"])]
    return [
        f"  gold score (0-100, greedy, 64 eval prompts): before {algo} {_fmt(s['gold_before'])} -> after {algo} "
        f"{_fmt(s['gold_after'])} (served model: {_fmt(s['gold_after_served'])})",
        f"  gold score of sampled responses (temperature 1, 4 per prompt): before {algo} "
        f"{_fmt(s.get('gold_sampled_before'))} -> after {algo} {_fmt(s.get('gold_sampled_after'))} "
        f"(served model: {_fmt(s.get('gold_sampled_served'))})",
        f"  {accuracy}   KL to reference: {_fmt(s['kl'], '.3f')}",
        f"  reward curve ({s['ppo_iterations']} {s['algo']} iterations; the reward model's score beside the hidden "
        f"gold judge's: a reward rising while gold falls is reward hacking):", *_curve_lines(s["reward_curve"])]


def learner_line(ranks: int, zero_stage: int | None) -> str:
    how = "ranks under the deepspeed launcher" if ranks > 1 else "rank (one process)"
    return f"learner: {ranks} ZeRO-{_fmt(zero_stage, 'd')} {how}"


def print_summary(s: dict) -> None:
    r = s["rollout"]
    everyone = f" (all {s['ranks']} ranks)" if s["ranks"] > 1 else ""
    reported = len(s.get("rank_reports") or [])
    missing = f"; only {reported} of {s['ranks']} ranks reported" if reported != s["ranks"] else ""
    lines = [
        "", "tandem up: done",
        f"  {learner_line(s['ranks'], s.get('zero_stage'))}{missing}",
        *_score_lines(s),
        f"  weight sync: {len(s['weight_versions_pushed'])} versions pushed (v{s['weight_versions_pushed'][0]}.."
        f"v{s['weight_versions_pushed'][-1]}), {s['bytes_pushed'] / 2**20:.2f} MB {s['push_encoding']} "
        f"({s['tensors_per_push']} tensors each), push {s['push_s_mean'] * 1e3:.0f} ms, "
        f"swap {s['swap_ms_mean']:.1f} ms mean / {s['swap_ms_max']:.1f} ms max",
        f"  rollouts{everyone}: {int(r.get('rollout_fresh', 0))} fresh, {int(r.get('rollout_stale', 0))} stale (<= "
        f"{s['max_staleness']} versions, importance-corrected), {int(r.get('rollout_dropped', 0))} dropped and "
        f"regenerated; {int(r.get('rollout_prefetched', 0))} batches generated during training",
        "  wall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in s["stage_wall_s"].items()),
        f"  served now: v{s['served_version']} ({s['served_origin']})",
        *_side_by_side_lines(s["side_by_side"]),
    ]
    if s["story_plot"]:
        lines.append(f"  the story in one picture: {s['story_plot']}")
    if s["plots"]:
        lines.append("  every metric: " + ", ".join(s["plots"]))
    print("\n".join(lines), flush=True)
