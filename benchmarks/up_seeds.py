"""`tandem up` over several seeds, one run at a time: the table issue 12 asks for.

    python -m benchmarks.up_seeds [--seeds 1 2 3 4 5 1234] [--algo ppo] [--out runs/up_seeds] [-- EXTRA up ARGS]

Each seed is a full `tandem up --seed N --summary FILE` in a child process (real server, real learner);
the table prints the gold score of the served model's greedy answers and of sampled answers (temperature
1, 4 per prompt) before and after RL, the KL to the reference, and the wall time of the run. The
summaries stay in OUT/seed<N>/summary.json; the table also goes to OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = ("seed", "greedy before", "greedy after (served)", "greedy gain", "sampled before", "sampled after",
           "sampled gain", "KL", "samples/s", "wall s")


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"seed{seed}"
    summary = run_dir / "summary.json"
    summary.unlink(missing_ok=True)
    # the installed `tandem` command, exactly as a user types it (the benchmark does not import the CLI)
    command = [str(Path(sys.executable).parent / "tandem"), "up", "--run-dir", str(run_dir), "--seed", str(seed),
               "--summary", str(summary), *extra]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - began
    (run_dir / "up.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not summary.is_file():
        print(f"seed {seed}: tandem up failed (exit {done.returncode}); log in {run_dir / 'up.log'}", file=sys.stderr)
        return {"seed": seed, "failed": True, "wall_s": wall}
    s = json.loads(summary.read_text())
    return {"seed": seed, "greedy_before": s["gold_before"], "greedy_after": s["gold_after_served"],
            "sampled_before": s["gold_sampled_before"], "sampled_after": s["gold_sampled_served"], "kl": s["kl"],
            "samples_per_s": s.get("rl_samples_per_s", float("nan")), "wall_s": wall}


def row_cells(r: dict) -> list[str]:
    if r.get("failed"):
        return [str(r["seed"]), "failed"] + [""] * (len(COLUMNS) - 3) + [f"{r['wall_s']:.0f}"]
    return [str(r["seed"]), f"{r['greedy_before']:.1f}", f"{r['greedy_after']:.1f}",
            f"{r['greedy_after'] - r['greedy_before']:+.1f}", f"{r['sampled_before']:.1f}", f"{r['sampled_after']:.1f}",
            f"{r['sampled_after'] - r['sampled_before']:+.1f}", f"{r['kl']:.2f}", f"{r['samples_per_s']:.1f}",
            f"{r['wall_s']:.0f}"]


def table(rows: list[dict], title: str) -> str:
    lines = [title, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    ok = [r for r in rows if not r.get("failed")]
    if ok:
        gains = [r["greedy_after"] - r["greedy_before"] for r in ok]
        sampled = [r["sampled_after"] - r["sampled_before"] for r in ok]
        lines += ["", f"greedy gain: mean {statistics.mean(gains):+.1f}, worst {min(gains):+.1f}; "
                      f"sampled gain: mean {statistics.mean(sampled):+.1f}, worst {min(sampled):+.1f}; "
                      f"wall: mean {statistics.mean(r['wall_s'] for r in ok):.0f} s, "
                      f"max {max(r['wall_s'] for r in ok):.0f} s; {len(rows) - len(ok)} failed"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.up_seeds", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 1234])
    parser.add_argument("--algo", default="", help="passed to tandem up --algo (default: its own default)")
    parser.add_argument("--out", default="runs/up_seeds", help="folder for the runs and the table")
    args = parser.parse_args(argv)
    if args.algo:
        extra = ["--algo", args.algo, *extra]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, out, extra))
        print(" | ".join(row_cells(rows[-1])), flush=True)
    text = table(rows, f"tandem up {' '.join(extra)} (load average {load:.1f} at the start, "
                       f"{os.getloadavg()[0]:.1f} at the end)")
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0 if all(not r.get("failed") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
