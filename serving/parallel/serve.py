"""`tandem serve --tp N`: the gRPC server on rank 0 of a tensor-parallel group (serving.parallel.runner).

Rank failure: when the watchdog reports a dead rank or a failed collective, the health service turns
NOT_SERVING at once, in-flight calls are cancelled (no grace: they cannot finish), the surviving ranks
are killed and `serve_tensor_parallel` returns 1, so the process exits non-zero instead of hanging.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from grpc_health.v1 import health_pb2

from protos.names import SERVICE_NAME
from serving.engine.config import EngineConfig
from serving.parallel.runner import TPModelRunner
from serving.rpc.server import GenerationServer, ServerConfig

log = logging.getLogger(__name__)


def build_tp_engine(config: EngineConfig, tp: int, on_failure: Callable[[str], None] | None = None,
                    collective_timeout_s: float = 60.0):
    """An LLMEngine whose model runs on `tp` ranks (rank 0 is this process). Call
    `engine.runner.shutdown()` when done."""
    from serving.engine.engine import LLMEngine

    runner = TPModelRunner(config, tp, collective_timeout_s=collective_timeout_s, on_failure=on_failure)
    try:
        return LLMEngine(config, runner=runner)
    except TypeError as exc:
        runner.shutdown()
        raise RuntimeError("serving.engine.engine.LLMEngine has no `runner=` injection point, which tensor "
                           "parallelism needs (see the TP integration diff)") from exc
    except BaseException:
        runner.shutdown()
        raise


class TPServer:
    """A GenerationServer over a TP engine that goes NOT_SERVING and stops when a rank fails."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, tp: int,
                 collective_timeout_s: float = 60.0):
        from protos.auth import PushAuth
        from serving.rpc.push_service import WeightPushHandler

        engine_config.validate()
        server_config.validate()
        auth = PushAuth.from_sources(server_config.push_token_file)
        self.failure: str | None = None
        self._server: GenerationServer | None = None
        self.engine = build_tp_engine(engine_config, tp, self._on_rank_failure, collective_timeout_s)
        try:
            self._server = GenerationServer(self.engine, server_config, model_name=engine_config.model,
                                            push_handler=WeightPushHandler.for_engine(
                                                self.engine, auth, swap_timeout_s=server_config.swap_timeout_s,
                                                limits=server_config.limits))
        except BaseException:
            self.engine.runner.shutdown()
            raise

    @property
    def server(self) -> GenerationServer:
        return self._server

    def _on_rank_failure(self, message: str) -> None:
        self.failure = message
        server = self._server
        if server is not None:
            for name in ("", SERVICE_NAME):
                server.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            server.request_stop()

    def start(self) -> int:
        return self._server.start()

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait(timeout)
        return 1 if self.failure is not None else code

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(0.0 if self.failure is not None else grace)
        self.engine.runner.shutdown()


def serve_tensor_parallel(engine_config: EngineConfig, server_config: ServerConfig, tp: int,
                          ready: Callable[[GenerationServer], None] | None = None) -> int:
    """Serve until SIGINT/SIGTERM (0), an engine crash (1) or a rank failure (1)."""
    tp_server = TPServer(engine_config, server_config, tp)
    tp_server.start()
    server = tp_server.server
    log.info("serving %s on %s with tp=%d", engine_config.model, server.address, tp)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: server.request_stop())
    if ready is not None:
        ready(server)
    code = tp_server.wait()
    if tp_server.failure is not None:
        log.error("a tensor-parallel rank failed (%s): exiting with code 1", tp_server.failure)
    tp_server.stop()
    return code
