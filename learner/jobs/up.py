"""`tandem up`: the main job. Serve a model, train it (SFT, reward model, PPO through the server), show it improved.

    run_up(UpConfig(run_dir="runs/up")) -> summary dict

1. the embedded default model (pre-trained and cached on first use) or --model;
2. the generation server as a child process (`tandem serve --port 0`, a fresh push token);
3. the learner as a child process (`python -m learner.jobs.up_worker`, or the deepspeed launcher for
   several ranks, ZeRO-3 by default: every rank reads the server address and the push-token file from the
   spec, rolls out its share through the server; rank 0 alone pushes and writes the figures): SFT, reward
   model, then PPO whose rollouts come from the server, overlapped with training under bounded staleness,
   with the actor pushed to the server after every iteration;
4. the figures: gold score before/after RL (and of the served model), reward-model accuracy, the
   reward curve (proxy reward beside gold and KL), the weight-sync figures, and the SFT model's and the
   served model's greedy answers to a few fixed held-out prompts side by side with their gold scores;
   <run>/story.png draws proxy reward against gold with KL beside it, the per-step grids stay as well.
   Real data has no gold judge: the run trains on the reward model's score and the report shows that score
   (held-out pairwise accuracy, reward of greedy answers to held-out prompts before/after, KL) and says so.
Ctrl-C or SIGTERM stops the learner (the launcher and every rank: one process group), then the server
(gracefully), and exits 130; a failed rank fails the launcher, which ends the others.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.errors import ConfigError
from common.files import write_private
from common.net import free_port
from common.process import ServiceProcess, child_env
from learner.config import PUSH_ENCODINGS
from learner.launcher import rank_command
from serving import launch

log = logging.getLogger(__name__)



@dataclass
class UpConfig:
    run_dir: str = "runs/up"
    model: str = ""                  # local HF folder; "" = the embedded default model
    data: list[str] = field(default_factory=list)   # dataset specs; [] = the pipeline's embedded data
    seed: int = 1234
    ranks: int = 1                   # learner ranks (the deepspeed launcher when > 1)
    zero_stage: int = -1             # -1: 0 for one rank, 3 for several
    iterations: int = 0              # PPO iterations; 0 = the pipeline's default
    algo: str = "ppo"                # step 3: ppo | grpo | rloo | reinforce++
    max_staleness: int = 1           # weight versions a rollout sample may lag the learner
    push_quantize: str = "none"      # none | bfloat16 | int8 | int4 on the wire
    summary: str = ""                # write the final figures here as JSON
    overrides: dict = field(default_factory=dict)   # {"sft"|"reward"|"ppo": {field: value}}
    server_threads: int = 1          # torch threads of the server process
    learner_threads: int = 1         # torch threads of each learner rank (2 cores: 1 + 1 beats contention)
    update_threads: int = 0          # threads of each rank's update phases once the server has finished the next
    #                                  batch (learner.config.PPOConfig.update_threads); 0: this machine's cores / ranks
    start_timeout_s: float = 300.0

    def validate(self) -> UpConfig:
        if not self.run_dir:
            raise ConfigError("run_dir", "must not be empty")
        if self.model and not (Path(self.model) / "config.json").is_file():
            raise ConfigError("model", f"no HF model folder (config.json) at {self.model!r}")
        if self.ranks < 1:
            raise ConfigError("ranks", f"must be >= 1, got {self.ranks}")
        if self.zero_stage not in (-1, 0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0..3 (or -1 for automatic), got {self.zero_stage}")
        if self.iterations < 0:
            raise ConfigError("iterations", f"must be >= 1 (0 = default), got {self.iterations}")
        from learner.config import ALGOS

        if self.algo not in ALGOS:
            raise ConfigError("algo", f"must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.max_staleness < 0:
            raise ConfigError("max_staleness", f"must be >= 0, got {self.max_staleness}")
        if self.push_quantize not in PUSH_ENCODINGS:
            raise ConfigError("push_quantize", f"must be one of {', '.join(PUSH_ENCODINGS)}, got {self.push_quantize!r}")
        unknown = set(self.overrides) - {"sft", "reward", "ppo"}
        if unknown:
            raise ConfigError("overrides", f"unknown step(s) {sorted(unknown)}: use sft, reward, ppo")
        for name in ("server_threads", "learner_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.update_threads < 0:
            raise ConfigError("update_threads", f"must be >= 0 (0: the cores / ranks), got {self.update_threads}")
        return self

    def placement(self) -> tuple[int, str]:
        """Each rank's update threads, and the line that says where everything runs. Server and learner share
        this machine's cores: the server generates the next batch while the learner makes its experience and
        starts its update, then idles, so the update phases that start after it is done take its cores too."""
        cores = os.cpu_count() or 1
        update = self.update_threads or max(self.learner_threads, cores // self.ranks)
        per_rank = "per rank " if self.ranks > 1 else ""
        return update, (f"placement on {cores} cores: server {self.server_threads} thread(s); learner "
                        f"{self.learner_threads} thread(s) {per_rank}while the server generates, {update} for the "
                        f"update phases that start once it is done")


def start_server(model: str, run_dir: Path, token_file: Path, threads: int, timeout: float,
                 http_port: int | None = None) -> ServiceProcess:
    """The server child; with `http_port`, its OpenAI-compatible HTTP front (and /metrics) on that port too."""
    env = child_env(OMP_NUM_THREADS=str(threads), TANDEM_PUSH_TOKEN="")
    http = ["--http-port", str(http_port)] if http_port is not None else []
    return launch.start_server(["--model", model, "--port", "0", "--push-token-file", str(token_file),
                                "--grace-period", "5", *http], env=env, log_file=run_dir / "server.log",
                               timeout_s=timeout)


def learner_command(spec_file: Path, ranks: int) -> list[str]:
    return rank_command("learner.jobs.up_worker", [str(spec_file)], ranks)


STEP_FOLDERS = ("sft", "reward", "ppo", "sync")


def clear_metrics(run_dir: Path) -> None:
    """An earlier run's metrics in the same folder: removed, since every step appends to its metrics.jsonl
    (the reward curve and story.png would draw both runs as one)."""
    for step in STEP_FOLDERS:
        (run_dir / step / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / step / "tb", ignore_errors=True)


def run_up(config: UpConfig) -> dict:
    """Run the whole job; returns the summary (also written to <run_dir>/up_summary.json and config.summary)."""
    from learner.jobs.up_report import finish, learner_line
    from learner.jobs.up_reward import NO_GOLD
    from learner.jobs.up_worker import step_configs
    from learner.ppo.gold import has_gold_judge

    config.validate()
    run_dir = Path(config.run_dir).resolve()
    token_file = run_dir / "push_token"
    zero_stage = config.zero_stage if config.zero_stage >= 0 else (0 if config.ranks == 1 else 3)
    spec = {"run_dir": str(run_dir), "server": "", "token_file": str(token_file), "model": config.model,
            "seed": config.seed, "data": config.data, "iterations": config.iterations, "algo": config.algo,
            "max_staleness": config.max_staleness, "encoding": PUSH_ENCODINGS[config.push_quantize],
            "deepspeed": {"zero_stage": zero_stage, "num_ranks": config.ranks},
            "overrides": config.overrides, "threads": config.learner_threads}
    spec["update_threads"], placement = config.placement()
    step_configs({**spec, "server": "127.0.0.1:1"})     # a bad --set or --data fails here, before anything starts
    run_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    times: dict[str, float] = {}
    model = str(Path(config.model).resolve()) if config.model else ""    # the children may start elsewhere
    if not model:
        from learner.task import default_model_path

        model = str(default_model_path())
    spec["model"] = model
    times["model_s"] = time.perf_counter() - began
    write_private(token_file, secrets.token_hex(16))

    server = learner = None
    try:
        t = time.perf_counter()
        http_port = free_port()
        server = start_server(model, run_dir, token_file, config.server_threads, config.start_timeout_s, http_port)
        times["server_start_s"] = time.perf_counter() - t
        host = server.address.rsplit(":", 1)[0]
        print(f"tandem up: serving {model} on {server.address} (log: {run_dir / 'server.log'})", flush=True)
        print(f"tandem up: OpenAI-compatible API on http://{host}:{http_port}/v1, metrics on "
              f"http://{host}:{http_port}/metrics", flush=True)
        print(f"tandem up: {learner_line(config.ranks, zero_stage)}", flush=True)
        print(f"tandem up: {placement}", flush=True)
        if not has_gold_judge(config.data or ["embedded"]):
            print(f"tandem up: {NO_GOLD}", flush=True)
        spec["server"] = server.address
        spec_file = run_dir / "up_spec.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        (run_dir / "learner.json").unlink(missing_ok=True)
        clear_metrics(run_dir)
        t = time.perf_counter()
        learner = ServiceProcess("learner", learner_command(spec_file, config.ranks), child_env())
        code = learner.wait()
        times["learner_s"] = time.perf_counter() - t
        if code != 0 or not (run_dir / "learner.json").is_file():
            why = "" if server.running else f" after the server exited (see {run_dir / 'server.log'})"
            raise RuntimeError(f"the learner failed (exit status {code}){why}; see its output above")
        learned = json.loads((run_dir / "learner.json").read_text())
        summary = finish(config, learned, server.address, model, times, began)
    finally:
        if learner is not None:
            learner.stop(grace=10.0)
        if server is not None:
            server.stop(grace=10.0)
    (run_dir / "up_summary.json").write_text(json.dumps(summary, indent=2))
    if config.summary:
        Path(config.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(config.summary).write_text(json.dumps(summary, indent=2))
    return summary


def config_dict(config: UpConfig) -> dict:
    return asdict(config)
