"""The sync and asyncio Python clients against a real server (TinyStories-656K, gRPC on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from clients.aio_client import AsyncTandemClient
from clients.client import TandemClient
from clients.results import Completion, Delta, Status, TandemError
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.rpc.server import GenerationServer, ServerConfig


@pytest.fixture(scope="module")
def server(tinystories_path):
    engine = LLMEngine(EngineConfig(model=str(tinystories_path), device="cpu", num_kv_blocks=256))
    srv = GenerationServer(engine, ServerConfig(port=0), model_name=str(tinystories_path))
    srv.start()
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def client(server):
    with TandemClient(server.address, timeout=60) as c:
        c.wait_ready(10)
        yield c


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_takes_text_token_ids_and_batches(client):
    [one] = client.generate("Once upon a time", temperature=0, max_new_tokens=16)
    assert isinstance(one, Completion) and one.index == 0 and one.text
    assert len(one.token_ids) == len(one.logprobs) <= 16 and one.finish_reason in ("stop", "length")
    assert all(lp <= 0 for lp in one.logprobs)
    [same] = client.generate(one.prompt_token_ids, temperature=0, max_new_tokens=16)   # ids as a prompt
    assert same.token_ids == one.token_ids and same.text == one.text
    batch = client.generate(["The cat", one.prompt_token_ids], temperature=0, max_new_tokens=16)
    assert [c.index for c in batch] == [0, 1] and batch[1].token_ids == one.token_ids


def test_stream_deltas_add_up_to_the_unary_completion(client):
    [done] = client.generate("Tom had a red ball.", temperature=0, max_new_tokens=24, stop=["."])
    deltas = list(client.generate_stream("Tom had a red ball.", temperature=0, max_new_tokens=24, stop=["."]))
    assert all(isinstance(d, Delta) for d in deltas)
    assert "".join(d.text for d in deltas) == done.text and "." not in done.text
    assert [t for d in deltas for t in d.token_ids] == done.token_ids
    assert deltas[0].prompt_token_ids == done.prompt_token_ids
    assert deltas[-1].finish_reason == done.finish_reason and all(d.finish_reason is None for d in deltas[:-1])


def test_seeded_sampling_is_reproducible(client):
    a = client.generate("Once upon a time", temperature=1.0, top_k=50, seed=7, max_new_tokens=20)[0]
    b = client.generate("Once upon a time", temperature=1.0, top_k=50, seed=7, max_new_tokens=20)[0]
    assert a.token_ids == b.token_ids


def test_leaving_a_stream_early_cancels_it_on_the_server(client):
    stream = client.generate_stream("Once upon a time", max_new_tokens=450, ignore_eos=True)
    next(stream)
    next(stream)
    assert client.status().running == 1
    stream.close()
    deadline = time.monotonic() + 10
    while (s := client.status()).kv_blocks_free != s.kv_blocks_total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.kv_blocks_free == s.kv_blocks_total and s.running == 0


def test_status_and_health(client, server):
    s = client.status()
    assert isinstance(s, Status) and s.model == server.service.model_name and s.max_model_len == 512
    assert client.health() == "SERVING" and client.health("") == "SERVING"


def test_errors_are_tandem_errors_with_the_code(client, server):
    with pytest.raises(TandemError) as info:
        client.generate("x", top_p=2.0)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "params.top_p" in info.value.details
    assert info.value.target == server.address
    with pytest.raises(TandemError) as info:
        list(client.generate_stream("", max_new_tokens=4))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "prompts[0].text" in info.value.details
    with pytest.raises(TypeError, match="temprature"):
        client.generate("x", temprature=0)


def test_unreachable_server():
    target = f"127.0.0.1:{closed_port()}"
    with TandemClient(target, timeout=5) as c:
        with pytest.raises(TandemError) as info:
            c.status()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and target in str(info.value)
        with pytest.raises(TimeoutError, match=target):
            c.wait_ready(0.5)


def test_async_client_matches_the_sync_client(client, server):
    [expected] = client.generate("Once upon a time", temperature=0, max_new_tokens=20)

    async def main():
        async with AsyncTandemClient(server.address, timeout=60) as ac:
            await ac.wait_ready(10)
            [one] = await ac.generate("Once upon a time", temperature=0, max_new_tokens=20)
            deltas = [d async for d in ac.generate_stream("Once upon a time", temperature=0, max_new_tokens=20)]
            many = await asyncio.gather(*[ac.generate(p, temperature=0, max_new_tokens=20)
                                          for p in ("Once upon a time", expected.prompt_token_ids)])
            status = await ac.status()
            health = await ac.health()
            with pytest.raises(TandemError) as info:
                await ac.generate("x", temperature=-1)
            return one, deltas, many, status, health, info.value

    one, deltas, many, status, health, err = asyncio.run(main())
    assert one.token_ids == expected.token_ids and one.text == expected.text
    assert "".join(d.text for d in deltas) == expected.text
    assert [c[0].token_ids for c in many] == [expected.token_ids] * 2
    assert isinstance(status, Status) and health == "SERVING"
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "params.temperature" in err.details
