"""The asyncio Python client: the same calls as TandemClient, as coroutines and an async iterator.

    async with AsyncTandemClient("127.0.0.1:50051") as client:
        await client.wait_ready(30)
        [completion] = await client.generate("Once upon a time", temperature=0)
        async for delta in client.generate_stream("Once upon a time"):
            print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.results import Completion, Delta, PromptLike, Status, TandemError, build_request
from protos import tandem_pb2, tandem_pb2_grpc
from protos.names import SERVICE_NAME


class AsyncTandemClient:
    """asyncio twin of clients.client.TandemClient (create it inside a running event loop)."""

    def __init__(self, target: str, timeout: float | None = None, *,
                 credentials: grpc.ChannelCredentials | None = None):
        self.target = target
        self.timeout = timeout
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
                         else grpc.aio.insecure_channel(target))
        self._stub = tandem_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def generate(self, prompts: PromptLike | Sequence[PromptLike], *, request_id: str = "",
                       timeout: float | None = None, **params) -> list[Completion]:
        """As TandemClient.generate (the same sampling options, logprobs_mode among them)."""
        request = build_request(prompts, params, request_id)
        try:
            response = await self._stub.Generate(request, timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise TandemError.from_rpc(self.target, err) from None
        return [Completion.from_proto(c) for c in response.completions]

    async def generate_stream(self, prompts: PromptLike | Sequence[PromptLike], *, request_id: str = "",
                              timeout: float | None = None, **params) -> AsyncIterator[Delta]:
        """Async iterator of Deltas; leaving the loop early (or `aclose()`) cancels the request."""
        request = build_request(prompts, params, request_id)
        call = self._stub.GenerateStream(request, timeout=self._deadline(timeout))
        try:
            async for msg in call:
                yield Delta.from_proto(msg)
        except grpc.RpcError as err:
            raise TandemError.from_rpc(self.target, err) from None
        finally:
            call.cancel()

    async def status(self, timeout: float | None = None) -> Status:
        try:
            msg = await self._stub.GetStatus(tandem_pb2.StatusRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise TandemError.from_rpc(self.target, err) from None
        return Status.from_proto(msg)

    async def health(self, service: str = SERVICE_NAME, timeout: float | None = None) -> str:
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                                timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise TandemError.from_rpc(self.target, err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.target} not ready after {timeout:.1f} s ({last})")
            try:
                response = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                    timeout=min(left, 5.0), wait_for_ready=True)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout
