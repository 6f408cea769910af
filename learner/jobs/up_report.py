"""What `tandem up` shows at the end: figures gathered from the learner, the live server and the metrics.

The served model is checked, not assumed: the version in force must be the last one pushed, and the
gold score of its greedy responses on the gold judge's eval prompts (over gRPC) is reported beside the learner's.
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
    from learner.plot import plot_run
    from learner.ppo.gold import has_gold_judge

    run_dir = Path(config.run_dir).resolve()
    gold_data = has_gold_judge(config.data or ["embedded"])
    with TandemClient(address, timeout=60) as client:
        status = client.status()
        served, pairs = None, []
        if gold_data:
            served, pairs = served_gold(client, model, learned["seed"], learned["max_prompt_len"],
                                        learned["max_new_tokens"])
        prompt = pairs[0][0] if pairs else "Once upon a time"
        t = time.perf_counter()
        [sample] = client.generate(prompt, temperature=0, max_new_tokens=learned["max_new_tokens"], timeout=60)
        sample_s = time.perf_counter() - t
    if status.weight_version != learned["final_version"]:
        raise RuntimeError(f"the server serves v{status.weight_version}, not the last pushed v{learned['final_version']}")
    sampled = sampled_gold(address, model, run_dir, learned) if gold_data else {}
    curve = reward_curve(run_dir)
    try:
        plots = [str(p) for p in plot_run(run_dir)]
    except Exception as err:  # noqa: BLE001 - the figures matter more than the pictures
        log.warning("plotting failed: %s", err)
        plots = []
    pushes = len(learned["push_s"])
    stage_s = {**{k: round(v, 2) for k, v in times.items()}, **{k: round(v, 2) for k, v in learned["times"].items()},
               "total_s": round(time.perf_counter() - began, 2)}
    summary = {
        "gold_before": learned["gold_before"], "gold_after": learned["gold_after"],
        "gold_gain": (learned["gold_after"] - learned["gold_before"]) if gold_data else None,
        "gold_after_served": served, **sampled, "reward_accuracy": learned["reward_accuracy"], "kl": learned["kl"],
        "ppo_iterations": learned["ppo_iterations"], "weight_versions_pushed": learned["versions_pushed"],
        "served_version": status.weight_version, "served_origin": status.weight_origin,
        "bytes_pushed": learned["bytes_pushed"], "push_encoding": learned["push_encoding"],
        "tensors_per_push": learned["tensors_per_push"],
        "push_s_mean": sum(learned["push_s"]) / pushes if pushes else 0.0,
        "swap_ms_mean": 1e3 * sum(learned["swap_s"]) / pushes if pushes else 0.0,
        "swap_ms_max": 1e3 * max(learned["swap_s"], default=0.0),
        "stage_s_mean": sum(learned["stage_s"]) / pushes if pushes else 0.0,
        "rollout": learned["rollout"], "max_staleness": config.max_staleness, "ranks": config.ranks,
        "stage_wall_s": stage_s, "reward_curve": curve, "plots": plots,
        "sample": {"prompt": prompt, "completion": sample.text, "weight_version": sample.weight_version,
                   "latency_s": round(sample_s, 3)},
        "checkpoint": learned["checkpoint"], "model": model, "run_dir": str(run_dir),
    }
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    def fmt(v, spec=".1f"):
        return "n/a" if v is None else format(v, spec)

    r = s["rollout"]
    lines = [
        "", "tandem up: done",
        f"  gold score (0-100, greedy, 64 eval prompts): before PPO {fmt(s['gold_before'])} -> after PPO "
        f"{fmt(s['gold_after'])} (served model: {fmt(s['gold_after_served'])})",
        f"  gold score of sampled responses (temperature 1, 4 per prompt): before PPO "
        f"{fmt(s.get('gold_sampled_before'))} -> after PPO {fmt(s.get('gold_sampled_after'))} "
        f"(served model: {fmt(s.get('gold_sampled_served'))})",
        f"  reward model held-out accuracy: {fmt(s['reward_accuracy'], '.3f')}   KL to reference: {fmt(s['kl'], '.3f')}",
        f"  reward curve ({s['ppo_iterations']} PPO iterations):", *_curve_lines(s["reward_curve"]),
        f"  weight sync: {len(s['weight_versions_pushed'])} versions pushed (v{s['weight_versions_pushed'][0]}.."
        f"v{s['weight_versions_pushed'][-1]}), {s['bytes_pushed'] / 2**20:.2f} MB {s['push_encoding']} "
        f"({s['tensors_per_push']} tensors each), push {s['push_s_mean'] * 1e3:.0f} ms, "
        f"swap {s['swap_ms_mean']:.1f} ms mean / {s['swap_ms_max']:.1f} ms max",
        f"  rollouts: {int(r.get('rollout_fresh', 0))} fresh, {int(r.get('rollout_stale', 0))} stale (<= "
        f"{s['max_staleness']} versions, importance-corrected), {int(r.get('rollout_dropped', 0))} dropped and "
        f"regenerated; {int(r.get('rollout_prefetched', 0))} batches generated during training",
        "  wall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in s["stage_wall_s"].items()),
        f"  served now: v{s['served_version']} ({s['served_origin']})",
        f"  sample: {s['sample']['prompt']!r} -> {s['sample']['completion']!r}",
    ]
    if s["plots"]:
        lines.append("  plots: " + ", ".join(s["plots"]))
    print("\n".join(lines), flush=True)
