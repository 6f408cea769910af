"""The synchronous Python client of a tandem generation server.

    with TandemClient("127.0.0.1:50051") as client:
        client.wait_ready(30)
        [completion] = client.generate("Once upon a time", temperature=0, max_new_tokens=32)
        for delta in client.generate_stream("Once upon a time", max_new_tokens=32):
            print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.results import (
    Completion,
    Delta,
    Experience,
    PromptLike,
    Status,
    TandemError,
    build_request,
    build_rollout_request,
)
from protos import tandem_pb2, tandem_pb2_grpc
from protos.auth import open_channel
from protos.names import SERVICE_NAME


class ExperienceStream:
    """The Experiences of one StreamExperience call; `cancel()` stops it (the server frees its KV blocks)."""

    def __init__(self, target: str, call):
        self.target, self._call = target, call

    def __iter__(self) -> Iterator[Experience]:
        try:
            for msg in self._call:
                yield Experience.from_proto(msg)
        except grpc.RpcError as err:
            raise TandemError.from_rpc(self.target, err) from None

    def cancel(self) -> None:
        self._call.cancel()


class TandemClient:
    """Unary and streaming generation, status and readiness over one gRPC channel.

    `timeout` is the default deadline of every call in seconds (None: no deadline); each method
    takes its own `timeout=` too. Failed calls raise TandemError (its `.code` is the gRPC status).
    `credentials` (protos.auth.channel_credentials(ca, cert, key)) connects over TLS.
    """

    def __init__(self, target: str, timeout: float | None = None, *,
                 credentials: grpc.ChannelCredentials | None = None):
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(target, credentials)
        self._stub = tandem_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, prompts: PromptLike | Sequence[PromptLike], *, request_id: str = "",
                 timeout: float | None = None, **params) -> list[Completion]:
        """Complete one prompt or a batch (a str or a list of ints is one prompt); one Completion each,
        in prompt order. Sampling options: temperature, top_p, top_k, seed, max_new_tokens,
        min_new_tokens, ignore_eos, stop_token_ids, stop, logprobs_mode ("raw", the default: logprobs of
        the model's own distribution; "processed": of the one sampled from, after temperature/top-k/top-p)."""
        request = build_request(prompts, params, request_id)
        try:
            response = self._stub.Generate(request, timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise TandemError.from_rpc(self.target, err) from None
        return [Completion.from_proto(c) for c in response.completions]

    def generate_stream(self, prompts: PromptLike | Sequence[PromptLike], *, request_id: str = "",
                        timeout: float | None = None, **params) -> Iterator[Delta]:
        """Stream the completion(s) as Deltas (`.index` tells batch members apart). Closing the
        iterator early (break, or `.close()`) cancels the request on the server."""
        request = build_request(prompts, params, request_id)
        call = self._stub.GenerateStream(request, timeout=self._deadline(timeout))
        try:
            for msg in call:
                yield Delta.from_proto(msg)
        except grpc.RpcError as err:
            raise TandemError.from_rpc(self.target, err) from None
        finally:
            call.cancel()            # no-op after a normal end; frees the server's blocks otherwise

    def stream_experience(self, prompts: PromptLike | Sequence[PromptLike], *, samples_per_prompt: int = 1,
                          rollout_id: str = "", timeout: float | None = None, **params) -> ExperienceStream:
        """A rollout for the learner: `samples_per_prompt` samples of every prompt, each an Experience as it
        finishes (in any order). The returned stream iterates them and can be cancelled from any thread."""
        request = build_rollout_request(prompts, params, samples_per_prompt, rollout_id)
        return ExperienceStream(self.target, self._stub.StreamExperience(request, timeout=self._deadline(timeout)))

    def status(self, timeout: float | None = None) -> Status:
        try:
            msg = self._stub.GetStatus(tandem_pb2.StatusRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise TandemError.from_rpc(self.target, err) from None
        return Status.from_proto(msg)

    def health(self, service: str = SERVICE_NAME, timeout: float | None = None) -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...) the server reports for `service`."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise TandemError.from_rpc(self.target, err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server reports SERVING; raise TimeoutError naming the server otherwise."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.target} not ready after {timeout:.1f} s ({last})")
            try:
                response = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                              timeout=min(left, 5.0), wait_for_ready=True)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout
