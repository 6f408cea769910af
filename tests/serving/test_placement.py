"""CPU placement: the engine thread on cores of its own, the front on the rest (serving.placement)."""

from __future__ import annotations

import argparse
import os
import threading

import pytest
import torch

from clients.client import TandemClient
from common.errors import ConfigError
from serving import options, placement
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.fleet.replicas import replica_options
from serving.rpc.server import GenerationServer, ServerConfig

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity needs Linux")


def test_auto_keeps_the_first_cores_for_the_engine_and_the_rest_for_the_front():
    plan = placement.plan("auto", 2, allowed={3, 5, 6, 9})
    assert plan == placement.Placement(frozenset({3, 5}), frozenset({6, 9}))
    assert plan.describe() == "engine thread on cpu 3,5, front on cpu 6,9"
    assert placement.plan("auto", 4, allowed={3, 5, 6, 9}) is None     # no core left for the front
    assert placement.plan("off", 1, allowed={0, 1}) is None


@linux
def test_a_core_list_is_the_engines_and_must_be_allowed():
    assert placement.plan("0-1,3", 1, allowed={0, 1, 2, 3}) == placement.Placement(frozenset({0, 1, 3}), frozenset({2}))
    assert placement.plan("0-1", 1, allowed={0, 1}).front == frozenset({0, 1})   # nothing else: the front shares
    with pytest.raises(ConfigError, match="cpu 7-8 not among") as err:
        placement.plan("0,7-8", 1, allowed={0, 1})
    assert err.value.field == "cpu_bind"
    for bad in ("zero", "3-1", "-1", "0,,1"):
        with pytest.raises(ConfigError) as err:
            ServerConfig(cpu_bind=bad).validate()
        assert err.value.field == "cpu_bind"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    return parser.parse_args(["--model", "m", *argv])


def test_the_command_line_binds_by_default_but_never_replicas_alone():
    assert _parse().cpu_bind == "auto"
    child = _parse(*replica_options(EngineConfig(model="m")))
    assert child.cpu_bind == "off"       # replicas share the cores: each binding core 0 would stack them there


def test_a_core_list_with_replicas_or_tp_names_the_option(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    args = _parse("--cpu-bind", "0", "--replicas", "2")
    args.model = str(tmp_path)
    parser = argparse.ArgumentParser(prog="serve")
    with pytest.raises(SystemExit) as done:
        options.run(args, parser)
    assert done.value.code == 2
    assert "--cpu-bind: a core list needs --tp 1 --replicas 1" in capsys.readouterr().err


def _affinity(tid: int) -> set[int]:
    return set(os.sched_getaffinity(tid))


@linux
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding needs two cores")
def test_a_bound_server_runs_its_engine_thread_apart_and_gives_the_cores_back(tinystories_path):
    allowed = _affinity(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", token_budget=128))
        server = GenerationServer(engine, ServerConfig(host="127.0.0.1", port=0, cpu_bind="auto"),
                                  model_name="tinystories")
        first = min(allowed)
        assert server.binding.placement.engine == {first}
        server.start()
        try:
            with TandemClient(server.address) as client:
                client.wait_ready()
                out = client.generate("Once upon a time", max_new_tokens=8, temperature=0.0, ignore_eos=True)
                assert len(out[0].token_ids) == 8
            assert _affinity(server.loop._thread.native_id) == {first}     # the engine thread
            assert _affinity(threading.get_native_id()) == allowed - {first}   # the thread that started it
            started = []                                                   # a front thread started later
            worker = threading.Thread(target=lambda: started.append(_affinity(0)))
            worker.start()
            worker.join()
            assert started == [allowed - {first}]
        finally:
            server.stop(grace=1.0)
        assert _affinity(threading.get_native_id()) == allowed            # the caller as it was
    finally:
        torch.set_num_threads(threads)


def test_an_in_process_server_binds_nothing_unless_asked(tinystories_path):
    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", token_budget=64))
    server = GenerationServer(engine, ServerConfig(host="127.0.0.1", port=0), model_name="tinystories")
    assert server.binding is None


@pytest.mark.slow
@linux
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding needs two cores")
def test_a_tensor_parallel_rank_0_never_binds_alone(tinystories_path):
    from serving.parallel.serve import build_tp_engine

    threads = torch.get_num_threads()
    engine = build_tp_engine(EngineConfig(model=str(tinystories_path), device="cpu", token_budget=64), 2)
    try:
        assert torch.get_num_threads() < len(os.sched_getaffinity(0))    # auto alone would bind rank 0
        server = GenerationServer(engine, ServerConfig(host="127.0.0.1", port=0, cpu_bind="auto"),
                                  model_name="tinystories")
        assert server.binding is None          # the other ranks run on the same cores, unbound
    finally:
        engine.runner.shutdown()
        torch.set_num_threads(threads)
