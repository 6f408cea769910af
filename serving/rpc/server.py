"""The gRPC server: the Generation service and the standard health service over one EngineLoop.

Sync gRPC with a thread pool, not grpc.aio: the engine is a single compute-bound thread, and a handler
only waits on its batch's queue, so one thread per RPC costs little; and sync gRPC's
`context.add_callback` fires the moment a client cancels or its deadline passes, even while the
handler is blocked, which is exactly when the request's KV blocks must be freed. grpc.aio would add an
event loop and a thread-to-loop bridge for every token without serving more clients than the engine can.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import ConfigError, InvalidRequest
from protos import tandem_pb2, tandem_pb2_grpc
from protos.auth import ServerTLS, add_port
from protos.names import SERVICE_NAME, reflected_services
from serving import placement
from serving.engine.config import EngineConfig
from serving.engine.loop import EngineDead, EngineLoop, RequestStream
from serving.limits import Admission, RequestLimits, ServerFull
from serving.metrics import EngineMetrics
from serving.rpc.convert import (
    ValidRequest,
    completion_to_proto,
    delta_to_proto,
    engine_error_field,
    request_from_proto,
    status_to_proto,
)
from serving.rpc.experience import ExperienceHandler

log = logging.getLogger(__name__)



@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051                 # 0: pick a free port
    grace_s: float = 10.0             # how long in-flight requests may run on after SIGINT/SIGTERM
    max_concurrent_rpcs: int = 256    # beyond this, RPCs get RESOURCE_EXHAUSTED instead of queueing
    push_token_file: str | None = None  # PushWeights credential (else $TANDEM_PUSH_TOKEN; else pushes refused)
    swap_timeout_s: float = 30.0      # a weight swap waits this long for running requests, then aborts them
    limits: RequestLimits = field(default_factory=RequestLimits)
    http_port: int | None = None      # the OpenAI-compatible HTTP front (serving.http): None = off, 0 = a free port
    api_key_file: str | None = None   # the HTTP front's API key (Authorization: Bearer KEY); None = open
    metrics_port: int | None = None   # a standalone Prometheus /metrics when the HTTP front is off (0: a free port)
    tls: ServerTLS = field(default_factory=ServerTLS)   # gRPC over TLS (optionally mutual); off: plaintext
    cpu_bind: str = "off"             # CPU engines: "auto", "off" or the engine thread's cores ("0-3"): see
    #                                   serving.placement. Off here, since an in-process server would move its
    #                                   caller's threads; `tandem serve` defaults to auto (the process is its own)

    def validate(self) -> ServerConfig:
        if not self.host:
            raise ConfigError("host", "must not be empty")
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError("port", f"must be in [0, 65535], got {self.port}")
        if not self.grace_s >= 0:
            raise ConfigError("grace_s", f"must be >= 0, got {self.grace_s}")
        if int(self.max_concurrent_rpcs) < 1:
            raise ConfigError("max_concurrent_rpcs", f"must be >= 1, got {self.max_concurrent_rpcs}")
        if not self.swap_timeout_s >= 0:
            raise ConfigError("swap_timeout_s", f"must be >= 0, got {self.swap_timeout_s}")
        self.limits.validate()
        self.tls.validate()
        placement.check(self.cpu_bind)
        if self.metrics_port is not None and not 0 <= int(self.metrics_port) <= 65535:
            raise ConfigError("metrics_port", f"must be in [0, 65535], got {self.metrics_port}")
        if self.http_port is not None or self.api_key_file is not None:
            self.http_config().validate()
        return self

    def http_config(self):
        from serving.http.server import HttpConfig

        return HttpConfig(host=self.host, port=self.http_port or 0, api_key_file=self.api_key_file,
                          max_inflight=self.max_concurrent_rpcs)


class GenerationService(tandem_pb2_grpc.GenerationServicer):
    """Generate, GenerateStream and GetStatus; PushWeights delegates to `push_handler`
    (serving.rpc.push_service.WeightPushHandler) when one is given; StreamExperience to
    serving.rpc.experience.ExperienceHandler."""

    def __init__(self, loop: EngineLoop, model_name: str, push_handler=None, limits: RequestLimits | None = None,
                 metrics=None):
        self.loop = loop
        self.limits = (limits or RequestLimits()).validate()
        self.admission = Admission(self.limits.max_pending)
        self.model_name = model_name
        self.push_handler = push_handler
        self.metrics = metrics
        self.started_at = time.monotonic()
        self.instance_id = uuid.uuid4().hex     # this process's identity: a restarted server gets a new one
        engine = loop.engine
        self._encode_text: Callable[[str], list[int]] = getattr(engine, "encode", None) or engine.tokenizer.encode
        self._encode_lock = threading.Lock()   # handler threads share the engine's tokenizer
        self._vocab_size = engine.info.vocab_size
        self._max_model_len = engine.info.max_model_len
        self.experience = ExperienceHandler(loop, self._encode, self._vocab_size, self._max_model_len,
                                            limits=self.limits, admission=self.admission,
                                            instance_id=self.instance_id)

    def Generate(self, request, context):
        valid, stream = self._start(request, context)
        completions: list = [None] * len(stream.request_ids)
        for index, out in self._outputs(stream, context):
            if out.finished:
                prompt_index, sample_index = valid.position(index)
                completions[index] = completion_to_proto(prompt_index, out, sample_index)
        if stream.cancelled:
            return tandem_pb2.GenerateResponse()   # the client is gone; nobody reads this
        return tandem_pb2.GenerateResponse(request_id=valid.request_id, completions=completions)

    def GenerateStream(self, request, context):
        valid, stream = self._start(request, context)
        started: set[int] = set()
        for index, out in self._outputs(stream, context):
            if not out.new_token_ids and not out.new_text and not out.finished:
                continue
            prompt_index, sample_index = valid.position(index)
            yield delta_to_proto(valid.request_id, prompt_index, out, first=index not in started,
                                 sample_index=sample_index)
            started.add(index)

    def GetStatus(self, request, context):
        try:
            stats, version, origin = self.loop.call(
                lambda e: (e.stats(), e.weight_version, e.weight_origin), timeout=60.0)
        except EngineDead as err:
            self._abort_dead(context, err)
        info = self.loop.engine.info
        return status_to_proto(stats, model=self.model_name, weight_version=version, weight_origin=origin,
                               tensor_parallel=getattr(info, "tensor_parallel", 1), device=str(info.device),
                               dtype=str(info.dtype).removeprefix("torch."),
                               uptime_s=time.monotonic() - self.started_at, instance_id=self.instance_id)

    def StreamExperience(self, request, context):
        return self.experience.stream_experience(request, context)

    def PushWeights(self, request_iterator, context):
        if self.push_handler is None:
            return super().PushWeights(request_iterator, context)   # UNIMPLEMENTED
        if self.metrics is None:
            return self.push_handler.push_weights(request_iterator, context, self.loop)
        try:
            result = self.push_handler.push_weights(request_iterator, context, self.loop)
        except BaseException:
            code = context.code() if hasattr(context, "code") else None
            self.metrics.push_refused(code.name.lower() if code is not None else "error")
            raise
        self.metrics.push_accepted(result.swap_s)
        return result

    def FinishPush(self, request, context):
        if self.push_handler is None:
            return super().FinishPush(request, context)     # UNIMPLEMENTED
        return self.push_handler.finish_push(request, context, self.loop)

    # ---------------------------------------------------------------- helpers

    def _encode(self, text: str) -> list[int]:
        with self._encode_lock:
            return self._encode_text(text)

    def _start(self, request, context) -> tuple[ValidRequest, RequestStream]:
        """Validate the whole batch, then submit it; cancellation or a deadline aborts it at once."""
        try:
            self.limits.check_generate(request)
            valid = request_from_proto(request, self._encode, self._vocab_size, self._max_model_len)
            self.limits.check_tokens(valid.prompts, valid.params.max_new_tokens, self._max_model_len)
        except InvalidRequest as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        try:
            self.admission.hold(len(valid.prompts), context)
        except ServerFull as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        stream = RequestStream(valid.engine_ids())
        if not context.add_callback(stream.cancel):    # fires on cancel, deadline and normal end
            stream.cancel()
        try:
            self.loop.submit(stream, valid.engine_prompts(), valid.engine_params())
        except EngineDead as err:
            self._abort_dead(context, err)
        return valid, stream

    def _outputs(self, stream: RequestStream, context) -> Iterator:
        try:
            for index, out in stream:
                if out.error is not None:     # this request alone was ended (bad numbers, a swap's deadline)
                    stream.cancel()
                    context.abort(grpc.StatusCode.ABORTED, f"prompts[{index}]: {out.error} (finish_reason abort)")
                yield index, out
        except InvalidRequest as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(engine_error_field(err)))
        except EngineDead as err:
            self._abort_dead(context, err)

    def _abort_dead(self, context, err: EngineDead) -> None:
        code = grpc.StatusCode.INTERNAL if self.loop.error is not None else grpc.StatusCode.UNAVAILABLE
        context.abort(code, str(err))


class GenerationServer:
    """A started gRPC server over one engine: `start()`, then `wait()` until stopped or the engine dies.

    `push_handler` (a serving.rpc.push_service.WeightPushHandler) enables PushWeights; its `swapper` gates
    the engine loop so that an update is swapped in between two steps, on a drained engine.
    """

    def __init__(self, engine, config: ServerConfig, model_name: str, push_handler=None):
        self.config = config.validate()
        self.port = 0
        gate = getattr(push_handler, "swapper", None)
        self.metrics = EngineMetrics(Path(model_name).name or model_name)   # labelled as the HTTP front names it
        self.binding = self._binding(engine)
        self.loop = EngineLoop(engine, on_death=self._on_engine_death, gate=gate, observer=self.metrics,
                               on_start=self.binding.bind_engine if self.binding else None)
        self.metrics.attach(self.loop)
        self.http = None             # serving.http.server.HttpFront, when config.http_port is set
        self.metrics_port = 0        # the standalone /metrics port, when config.metrics_port is set
        self.health = health.HealthServicer()
        self._done = threading.Event()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_concurrent_rpcs + 4,
                                                            thread_name_prefix="grpc"),
                                 maximum_concurrent_rpcs=config.max_concurrent_rpcs,
                                 # so_reuseport 0: a taken port is an error, not shared
                                 options=[("grpc.so_reuseport", 0)] + config.limits.grpc_options())
        self.service = GenerationService(self.loop, model_name, push_handler, limits=config.limits,
                                         metrics=self.metrics)
        tandem_pb2_grpc.add_GenerationServicer_to_server(self.service, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(reflected_services(), self._grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def _binding(self, engine) -> placement.Binding | None:
        """CPU engines of one rank only (TP ranks share the cores): the engine thread's torch threads
        decide how many cores it keeps."""
        import torch

        if not str(engine.info.device).startswith("cpu") or getattr(engine.info, "tensor_parallel", 1) > 1:
            return None
        plan = placement.plan(self.config.cpu_bind, torch.get_num_threads())
        return placement.Binding(plan) if plan is not None else None

    def start(self) -> int:
        """Bind, start the engine thread and the server, report SERVING; return the bound port."""
        where = f"{self.config.host}:{self.config.port}"
        try:
            self.port = add_port(self._grpc, where, self.config.tls)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise ConfigError("port", f"cannot bind {where}: the port is taken or the host is not local")
        if self.binding is not None:
            self.binding.bind_front()     # before any front thread starts: they inherit the front's cores
        self.loop.start()
        self._grpc.start()
        self._start_http()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def _start_http(self) -> None:
        """The HTTP front (with /metrics) or a standalone /metrics port, beside gRPC over the same loop."""
        if self.config.http_port is not None:
            from serving.http.server import HttpFront

            self.http = HttpFront(self.loop, self.config.http_config(), self.service.model_name,
                                  self.service._encode_lock, metrics=self.metrics, serving=self._serving,
                                  limits=self.service.limits, admission=self.service.admission)
            self.http.start()
        if self.config.metrics_port is not None:
            from serving.metrics import serve_metrics

            httpd, _ = serve_metrics(self.metrics, self.config.host, self.config.metrics_port)
            self.metrics_port = httpd.server_port
            self._metrics_httpd = httpd

    def _serving(self) -> bool:
        return self.loop.alive and not self._done.is_set()

    def request_stop(self) -> None:
        """Ask `wait()` to return (signal handlers call this). A second request cuts the grace period
        short: in-flight RPCs are cancelled, which aborts their engine requests."""
        if self._done.is_set():
            log.warning("second stop request: cancelling in-flight requests now")
            self._grpc.stop(0)
        self._done.set()

    def wait(self, timeout: float | None = None) -> int:
        """Block until a stop is requested or the engine dies; return the exit code (0 or 1)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(0.5):     # short waits so signal handlers run promptly
            if deadline is not None and time.monotonic() >= deadline:
                break
        return 1 if self.loop.error is not None else 0

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, let in-flight ones finish within `grace` s, then stop the engine."""
        grace = self.config.grace_s if grace is None else grace
        self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.stop(grace)
        if self.metrics_port:
            self._metrics_httpd.shutdown()
        self._grpc.stop(grace).wait()
        self.loop.stop()
        if self.binding is not None:
            self.binding.restore()
        self._done.set()

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _on_engine_death(self, err: BaseException) -> None:
        log.error("engine thread died (%s: %s): NOT_SERVING", type(err).__name__, err)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._done.set()


def start_server(engine_config: EngineConfig, server_config: ServerConfig | None = None,
                 **server_fields) -> GenerationServer:
    """Load the model and start serving it in this process (benchmarks, notebooks, tests); the caller
    calls `.stop()`. `server_fields` override ServerConfig fields, e.g. `port=0`."""
    from protos.auth import PushAuth
    from serving.engine.engine import LLMEngine
    from serving.rpc.push_service import WeightPushHandler

    if server_config is not None and server_fields:
        raise TypeError("give either server_config or ServerConfig fields, not both")
    server_config = ServerConfig(**server_fields) if server_config is None else server_config
    engine_config.validate()
    server_config.validate()
    auth = PushAuth.from_sources(server_config.push_token_file)
    engine = LLMEngine(engine_config)
    server = GenerationServer(engine, server_config, model_name=engine_config.model,
                              push_handler=WeightPushHandler.for_engine(engine, auth, swap_timeout_s=server_config.swap_timeout_s,
                                                                        limits=server_config.limits))
    server.start()
    return server


def serve(engine_config: EngineConfig, server_config: ServerConfig,
          ready: Callable[[GenerationServer], None] | None = None) -> int:
    """Load the model, serve until SIGINT/SIGTERM (exit code 0) or an engine crash (exit code 1)."""
    server = start_server(engine_config, server_config)
    log.info("serving %s on %s", engine_config.model, server.address)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: server.request_stop())
    if ready is not None:
        ready(server)
    code = server.wait()
    log.info("shutting down (grace %.1f s)", server_config.grace_s)
    server.stop()
    return code
