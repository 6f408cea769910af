"""Two real `tandem serve` replicas behind one Balancer address on 127.0.0.1: least-loaded routing, a
replica killed mid-run (its requests are retried on the other, every request completes with the greedy
result), the dead replica out of rotation, and the balancer's own health and errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from clients.client import TandemClient
from clients.results import TandemError
from common.errors import ConfigError
from serving.fleet.balancer import Balancer, BalancerConfig
from serving.fleet.replicas import wait_for_replicas

PROMPTS = [f"Once upon a time, there was a {animal} who" for animal in
           ("cat", "dog", "bird", "fish", "frog", "bear", "duck", "lion", "cow", "pig", "owl", "fox")]
GREEDY = dict(temperature=0, max_new_tokens=160, ignore_eos=True)


PUSH_TOKEN = "balancer-test-token"


def start_replica(model) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "--log-level", "WARNING", "serve", "--model",
                             str(model), "--port", "0", "--device", "cpu", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "TANDEM_PUSH_TOKEN": PUSH_TOKEN})


@pytest.fixture(scope="module")
def replicas(tinystories_path):
    procs = [start_replica(tinystories_path) for _ in range(2)]
    try:
        addresses = []
        for proc in procs:
            line = proc.stdout.readline()
            assert " on " in line, f"replica did not start (exit {proc.poll()})"
            addresses.append(line.split()[-1])
        yield procs, addresses
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_balancer_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="backends"):
        BalancerConfig(backends=[]).validate()
    with pytest.raises(ConfigError, match="backends.*'localhost'"):
        BalancerConfig(backends=["localhost"]).validate()


@pytest.mark.slow
def test_a_replica_killed_mid_run_the_remaining_requests_still_complete(replicas, tinystories_path, tmp_path):
    procs, addresses = replicas
    token_file = tmp_path / "push-token"
    token_file.write_text(PUSH_TOKEN)
    balancer = Balancer(BalancerConfig(backends=addresses, port=0, health_interval_s=0.2,
                                       push_token_file=str(token_file)))
    balancer.start()
    try:
        wait_for_replicas(balancer, timeout_s=60)
        client = TandemClient(balancer.address, timeout=120)
        assert client.health() == "SERVING"
        routed = sum(r.served for r in balancer.replicas)
        with pytest.raises(TandemError) as info:                   # passed through untouched, not retried
            client.generate("Once", temperature=-1.0)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in info.value.details
        assert sum(r.served for r in balancer.replicas) == routed + 1  # one replica saw it, none other

        # a weight push through the balancer reaches every replica (the credential travels with it)
        from clients.weight_push import current_version, hf_tensors, push_weights

        with pytest.raises(TandemError) as info:
            push_weights(balancer.address, hf_tensors(tinystories_path), token="wrong", version=1)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        report = push_weights(balancer.address, hf_tensors(tinystories_path), token=PUSH_TOKEN, version=1)
        assert report.version == 1 and [current_version(a) for a in addresses] == [1, 1]

        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                [completion] = client.generate(PROMPTS[i], **GREEDY)
                results[i] = completion.token_ids
            except BaseException as err:  # noqa: BLE001 - reported by the assertion below
                errors.append(err)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(r.served for r in balancer.replicas) < len(PROMPTS) or balancer.replicas[0].in_flight == 0:
            assert time.monotonic() < deadline, "requests were not spread over both replicas"
            time.sleep(0.01)
        in_flight_on_killed = balancer.replicas[0].in_flight
        procs[0].kill()                                            # SIGKILL mid-run: no goodbye
        for t in threads:
            t.join(120)
        print(f"killed replica 0 with {in_flight_on_killed} requests in flight; served: "
              f"{[r.served for r in balancer.replicas]}")
        assert not errors, errors
        assert in_flight_on_killed > 0 and sorted(results) == list(range(len(PROMPTS)))
        assert all(len(tokens) == GREEDY["max_new_tokens"] for tokens in results.values())

        deadline = time.monotonic() + 10
        while balancer.replicas[0].healthy:                        # out of rotation
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.health() == "SERVING"                        # one replica left
        for i in (0, 5, 11):                                       # the retried ones equal a fresh greedy run
            [again] = client.generate(PROMPTS[i], **GREEDY)
            assert again.token_ids == results[i]
        streamed = [t for d in client.generate_stream(PROMPTS[3], **GREEDY) for t in d.token_ids]
        assert streamed == results[3]
        client.close()
    finally:
        balancer.stop(0)


def test_replicas_are_started_with_the_servers_limits_and_swap_timeout():
    """`tandem serve --replicas R --max-pending N --swap-timeout S`: each replica's command line rebuilds
    the same request limits and swap timeout (they used to start with the defaults)."""
    import argparse

    from serving import limits, options
    from serving.fleet.replicas import replica_options

    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--max-pending", "7", "--max-stop-strings", "3", "--swap-timeout", "2.5",
                              "--replicas", "2"])
    config = options.engine_config(args)
    from serving.rpc.server import ServerConfig

    server = ServerConfig(limits=limits.from_args(args), swap_timeout_s=args.swap_timeout)
    child = parser.parse_args(replica_options(config, server_options=options.server_argv(server)))
    assert limits.from_args(child) == limits.from_args(args)
    assert child.swap_timeout == 2.5 and child.port == 0 and child.host == "127.0.0.1"
    assert options.engine_config(child) == config
