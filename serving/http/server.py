"""The HTTP front's server: uvicorn on its own thread and event loop, in the server process, over the same
EngineLoop as gRPC. `HttpFront(...).start()` binds (port 0: a free one) and returns the port; `stop()`
lets in-flight requests finish within a grace period."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from serving.engine.loop import EngineLoop
from serving.engine.sampling_params import per_sample
from serving.http.protocol import Codec, Plan
from serving.limits import Admission, RequestLimits

log = logging.getLogger(__name__)


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000                   # 0: pick a free port
    api_key_file: str | None = None    # when set, /v1/* needs `Authorization: Bearer <the file's content>`
    served_model_name: str = ""        # "" = the model folder's name
    max_inflight: int = 256            # beyond this, 429

    def validate(self) -> HttpConfig:
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError("http_port", f"must be in [0, 65535], got {self.port}")
        if self.api_key_file is not None:
            path = Path(self.api_key_file)
            if not path.is_file() or not path.read_text().strip():
                raise ConfigError("api_key_file", f"no API key in {self.api_key_file}")
        if int(self.max_inflight) < 1:
            raise ConfigError("max_inflight", f"must be >= 1, got {self.max_inflight}")
        return self

    def api_key(self) -> str | None:
        return Path(self.api_key_file).read_text().strip() if self.api_key_file else None


class HttpFront:
    def __init__(self, loop: EngineLoop, config: HttpConfig, model_path: str, tokenizer_lock: threading.Lock,
                 metrics=None, serving=None, limits=None, admission=None):
        import uvicorn

        from serving.http.app import build_app

        self.config = config.validate()
        self.loop = loop
        engine = loop.engine
        self.codec = Codec(engine.tokenizer, tokenizer_lock, engine.info.vocab_size, engine.info.max_model_len)
        self.model_path = model_path
        self.model_id = config.served_model_name or Path(model_path).name or model_path
        self.model_aliases = {self.model_id, model_path}
        self.api_key = config.api_key()
        self.metrics = metrics
        self.max_inflight = config.max_inflight
        self.inflight = 0                   # touched only on the event loop's thread
        # the request limits and the running + queued count are the server's, shared with gRPC
        self.limits = limits if limits is not None else RequestLimits()
        self.admission = admission if admission is not None else Admission(self.limits.max_pending)
        self.created = int(time.time())
        self._serving = serving or (lambda: loop.alive)
        self.port = 0
        self._uvicorn = uvicorn.Server(uvicorn.Config(build_app(self), log_level="warning", access_log=False,
                                                      lifespan="off", timeout_graceful_shutdown=10))
        self._thread: threading.Thread | None = None

    def serving(self) -> bool:
        return bool(self._serving())

    async def weights(self) -> tuple[int, str]:
        return await asyncio.to_thread(self.loop.call, lambda e: (e.weight_version, e.weight_origin), 30.0)

    def engine_params(self, plan: Plan):
        return per_sample(plan.params, plan.n, len(plan.prompts))

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> int:
        sock = socket.socket(socket.AF_INET6 if ":" in self.config.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as err:
            sock.close()
            raise ConfigError("http_port", f"cannot bind {self.config.host}:{self.config.port}: {err}") from None
        sock.listen(2048)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="http-front",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uvicorn.started:
            raise RuntimeError("the HTTP front did not start (see the log)")
        log.info("OpenAI-compatible HTTP front on http://%s/v1", self.address)
        return self.port

    def stop(self, grace: float = 10.0) -> None:
        self._uvicorn.config.timeout_graceful_shutdown = grace
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(grace + 5)
