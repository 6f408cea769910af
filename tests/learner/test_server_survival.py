"""The learner survives the generation server: a real server process (python -m serving) is killed with
SIGKILL in the middle of remote PPO and started again on the same port; the run goes on. A server that
stays down ends the run with a clear error, and `python -m learner` with a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from clients.client import TandemClient
from learner.ppo.step import run_ppo
from learner.rollout.reconnect import ServerDown
from serving.launch import start_server

TOKEN = "survival-token"


def _serve(ppo_run, token_file, port: int = 0, log_name: str = "server.log"):
    return start_server(["--model", str(ppo_run.root / "sft"), "--device", "cpu", "--port", str(port),
                         "--kv-blocks", "256", "--push-token-file", str(token_file)],
                        log_file=ppo_run.root / log_name)


def _kill(proc) -> None:
    os.killpg(proc.proc.pid, signal.SIGKILL)     # no goodbye: in-flight calls break, weights are lost
    proc.proc.wait()


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    return path


@pytest.mark.slow
def test_ppo_goes_on_when_the_server_is_killed_and_restarted_mid_run(ppo_run, token_file, caplog):
    first = _serve(ppo_run, token_file)
    port = int(first.address.rsplit(":", 1)[1])
    with TandemClient(first.address) as client:
        old = client.status(timeout=10)
    second: dict = {}

    def restart() -> None:
        second["proc"] = _serve(ppo_run, token_file, port=port, log_name="server2.log")

    def after_iteration(iteration, models, stats) -> None:
        if iteration == 2:       # after iteration 2's push: the prefetched batch 3 came from this process
            _kill(first)
            second["thread"] = threading.Thread(target=restart, daemon=True)
            second["thread"].start()       # the learner meets a dead port first, then a fresh server (v0)

    config = ppo_run.config("survive", rollout="remote", server=first.address, push_weights=True,
                            push_token_file=str(token_file), iterations=4, max_staleness=1,
                            server_down_limit_s=240, rpc_timeout_s=120)
    try:
        caplog.set_level("INFO", logger="learner.rollout")
        result = run_ppo(config, after_iteration=after_iteration)
        second["thread"].join()
        with TandemClient(first.address) as client:
            now = client.status(timeout=10)
    finally:
        first.stop(grace=1.0)
        if "thread" in second:
            second["thread"].join()
        if "proc" in second:
            second["proc"].stop(grace=1.0)

    assert result["iterations"] == 4 and result["server_restarts"] == 1
    rows = [json.loads(line) for line in open(ppo_run.root / "survive" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["server_restarts"] for r in rows] == [0, 0, 1, 1]      # noticed before iteration 3's rollout
    # the learner's versions ran on undisturbed; the new process ends serving the final one, pushed after iteration 4
    v0 = result["first_version"]
    assert v0 == old.weight_version + 1 and result["final_version"] == v0 + 4
    assert [p["version"] for p in result["pushes"]] == [v0 + 1, v0 + 2, v0 + 3, v0 + 4]
    assert now.instance_id != old.instance_id and now.weight_version == v0 + 4
    assert "ppo iteration 4" in now.weight_origin
    # iterations 1-2 trained on the old process's samples, 3-4 on the new one's: the batch prefetched from the
    # old process before the kill was dropped (iteration 3 was not served from a prefetch), never trained on
    assert result["rollout_instances"] == {old.instance_id: 8, now.instance_id: 8}
    totals = result["rollout"]
    assert totals["rollout_prefetched"] == 2                  # iterations 2 and 4 only
    assert totals["rollout_fresh"] + totals["rollout_stale"] == 16
    assert any("restarted" in r.getMessage() for r in caplog.records)
    assert any("unreachable" in r.getMessage() for r in caplog.records)   # it waited with back-off


@pytest.mark.slow
def test_a_server_that_stays_down_ends_the_run_with_a_clear_error(ppo_run, token_file, capsys):
    server = _serve(ppo_run, token_file)
    killed: dict = {}

    def after_iteration(iteration, models, stats) -> None:
        if iteration == 1:
            _kill(server)
            killed["at"] = time.monotonic()

    config = ppo_run.config("down", rollout="remote", server=server.address, push_weights=True,
                            push_token_file=str(token_file), iterations=3, server_down_limit_s=3)
    try:
        with pytest.raises(ServerDown) as err:
            run_ppo(config, after_iteration=after_iteration)
    finally:
        server.stop(grace=1.0)
    waited = time.monotonic() - killed["at"]
    message = str(err.value)
    assert server.address in message and "server_down_limit_s=3 s" in message and "UNAVAILABLE" in message
    assert 3 <= waited < 60             # it waited for the limit, then gave up (bounded, not forever)

    # the command line: exit status 1 and the same message, no traceback (the port is dead from the start)
    from learner.__main__ import main

    code = main(ppo_run.cli_args("down_cli", "--iterations", "1", "--rollout", "remote", "--server", server.address,
                                 "--server_down_limit_s", "1"))
    stderr = capsys.readouterr().err
    assert code == 1
    assert f"python -m learner ppo: error: the generation server at {server.address} stayed unreachable" in stderr
    assert "server_down_limit_s=1 s" in stderr and "Traceback" not in stderr
