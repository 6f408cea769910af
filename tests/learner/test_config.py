"""Configuration at the edge: options from dataclasses, JSON + command line precedence, and bad
configurations refused at start with a message naming the field (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli import learn
from common.errors import ConfigError
from learner.__main__ import main
from learner.cli_args import parse_config


def test_json_file_then_command_line_override(tmp_path):
    cfg = tmp_path / "ppo.json"
    cfg.write_text(json.dumps({"deepspeed": {"zero_stage": 2, "dtype": "bfloat16"}, "lora_dim": 8,
                               "data": ["embedded:64"], "kl_coef": 0.05, "whiten_advantages": False}))
    config = parse_config("ppo", ["--config", str(cfg), "--zero-stage", "1", "--only_optimize_lora",
                                  "--data", "embedded", "embedded:10", "--kl_coef", "0.2"])
    assert config.deepspeed.zero_stage == 1 and config.deepspeed.dtype == "bfloat16"
    assert config.lora.lora_dim == 8 and config.lora.only_optimize_lora is True
    assert config.data == ["embedded", "embedded:10"] and config.kl_coef == 0.2
    assert config.whiten_advantages is False and config.iterations == 20  # untouched default
    assert parse_config("sft", ["--mask_prompt", "false"]).mask_prompt is False


@pytest.mark.parametrize("argv, field", [
    (["--learning_rate", "fast"], "learning_rate"),
    (["--resume", "maybe"], "resume"),
    (["--zero_stage", "5"], "zero_stage"),
    (["--dtype", "float16"], "dtype"),
    (["--eval_fraction", "1.5"], "eval_fraction"),
])
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError) as err:
        parse_config("sft", argv)
    assert err.value.field == field


@pytest.mark.parametrize("argv, field", [
    (["--server_down_limit_s", "0"], "server_down_limit_s"),
    (["--rpc_timeout_s", "-1"], "rpc_timeout_s"),
])
def test_bad_server_survival_limits_name_the_field(argv, field):
    with pytest.raises(ConfigError) as err:
        parse_config("ppo", argv).validate()
    assert err.value.field == field


def test_unknown_json_keys_are_refused(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lora": {"lora_rank": 4}}))
    with pytest.raises(ConfigError, match="lora.lora_rank"):
        parse_config("sft", ["--config", str(cfg)])
    cfg.write_text("{broken")
    with pytest.raises(ConfigError) as err:
        parse_config("sft", ["--config", str(cfg)])
    assert err.value.field == "config"


@pytest.fixture()
def model_args(tinystories_path):
    return ["--model", str(tinystories_path)]


@pytest.mark.parametrize("step, argv, field", [
    ("sft", ["--data", "hh-rlhf:/no/such/data.jsonl"], "data"),
    ("reward", ["--data_split", "0,0,0"], "data_split"),
    ("sft", ["--lora_dim", "0", "--only_optimize_lora"], "lora_dim"),
    ("reward", ["--tokenizer", "/no/such/tokenizer"], "tokenizer"),
    ("ppo", ["--actor_model", "/no/such/actor"], "actor_model"),
])
def test_bad_configuration_fails_at_start_naming_the_field(step, argv, field, model_args, capsys):
    assert main([step, *model_args, *argv]) == 2
    err = capsys.readouterr().err
    assert f"error: {field}:" in err and "Traceback" not in err


def test_tokenizer_folder_without_a_tokenizer_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["sft", "--model", str(tmp_path), "--data", "embedded:8", "--output_dir", str(tmp_path / "o")]) == 2
    assert "error: tokenizer:" in capsys.readouterr().err


def test_the_command_line_exits_2_without_traceback_and_tandem_learn_launches_nothing(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "learner", "sft", "--data", "/no/such/file.jsonl"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: data:" in proc.stderr and "/no/such/file.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert learn.main(["reward", "--num-ranks", "2", "--data_split", "1,x,1"]) == 2
    assert "tandem learn reward: error: data_split:" in capsys.readouterr().err
    command = learn.launcher_command("sft", ["--max_steps", "3"], 2, 29555)
    assert command[1:] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29555",
                           "--module", "learner", "sft", "--max_steps", "3"]


def test_reward_step_on_data_without_pairs_names_the_data_field(tmp_path, tinystories_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a story\nanother story\nthe end\n")
    code = main(["reward", "--model", str(tinystories_path), "--data", f"text:{corpus}", "--data_split", "0,1,0",
                 "--eval_fraction", "0", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "error: data: no preference pairs" in err and "Traceback" not in err
