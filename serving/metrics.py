"""Prometheus metrics of one server, named as vLLM names them so existing dashboards work.

`EngineMetrics` is the engine loop's observer (serving.engine.loop.EngineLoop): it times every request
from its arrival (queue time, time to first token, inter-token latency, end-to-end latency) and counts
prompt and generation tokens and finished requests by reason, on the engine thread. Engine state
(requests running and waiting, KV cache usage, prefix-cache hits, preemptions, the weight version in
force) is read at scrape time between two steps. Tandem's own series: weight pushes accepted and
refused by reason, and the swap pause.

Each server has its own CollectorRegistry (several servers in one process do not collide). Export:
`render()` for an HTTP route, or `serve_metrics(host, port)` for a standalone `/metrics` endpoint.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# buckets close to vLLM's, in seconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 10.0, 20.0, 40.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0)
SCRAPE_TIMEOUT_S = 5.0


class _Request:
    __slots__ = ("arrival", "scheduled", "last_token")

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.scheduled = False
        self.last_token: float | None = None


class EngineMetrics:
    """The observer of one EngineLoop and the registry its series live in; `attach(loop)` before scraping."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._loop = None
        self._requests: dict[str, _Request] = {}
        self._last_state: dict | None = None
        r, labels, model = self.registry, ["model_name"], (model_name,)

        def counter(name, doc, extra=()):
            return Counter(name, doc, labels + list(extra), registry=r)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*model)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.").labels(*model)
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens processed.").labels(*model)
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prefix-cache queries, in prompt tokens looked up.").labels(*model)
        self.request_success = counter("vllm:request_success", "Finished requests, by finish reason.",
                                       ["finished_reason"])
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between two output tokens in seconds.",
                             ITL_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Time per output token in seconds (vLLM's older name of the inter-token latency).",
                              ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Time a request waited before its first scheduled step, in seconds.",
                                    LATENCY_BUCKETS)
        self.pushes = counter("tandem:weight_pushes", "Weight pushes by result: accepted, or the refusal reason.",
                              ["result"])
        self.swap_pause = histogram("tandem:weight_swap_pause_seconds",
                                    "Serving pause while pushed weights were swapped in, in seconds.",
                                    (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        r.register(_EngineStateCollector(self))

    def attach(self, loop) -> None:
        self._loop = loop

    # ---------------------------------------------------------------- the engine thread (EngineLoop observer)

    def on_added(self, request_id: str, arrival: float) -> None:
        self._requests[request_id] = _Request(arrival)

    def on_aborted(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self.request_success.labels(self.model_name, "abort").inc()

    def on_step(self, engine, outputs, started: float) -> None:
        now = time.monotonic()
        schedule = engine.last_schedule
        if schedule is not None:
            for seq in schedule.seqs:
                req = self._requests.get(seq.request_id)
                if req is not None and not req.scheduled:
                    req.scheduled = True
                    self.queue_time.observe(max(0.0, started - req.arrival))
                    self.prefix_cache_queries.inc(len(seq.prompt_token_ids))
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is None:
                continue
            new = len(out.new_token_ids)
            self.generation_tokens.inc(new)
            if req.last_token is None:
                self.ttft.observe(now - req.arrival)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
            elif new:
                gap = (now - req.last_token) / new
                self.itl.observe(gap)
                self.tpot.observe(gap)
            req.last_token = now
            if out.finished:
                del self._requests[out.request_id]
                self.e2e.observe(now - req.arrival)
                self.request_success.labels(self.model_name, out.finish_reason or "stop").inc()

    # ---------------------------------------------------------------- weight pushes (gRPC handler threads)

    def push_accepted(self, swap_s: float) -> None:
        self.pushes.labels(self.model_name, "accepted").inc()
        self.swap_pause.observe(swap_s)

    def push_refused(self, reason: str) -> None:
        self.pushes.labels(self.model_name, reason).inc()

    # ---------------------------------------------------------------- export

    def state(self) -> dict | None:
        """Engine gauges read on the engine thread between two steps (the last ones if it has stopped)."""
        if self._loop is not None and self._loop.alive:
            try:
                self._last_state = self._loop.call(_engine_state, timeout=SCRAPE_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - a scrape must not fail because the engine is busy or gone
                log.debug("metrics scrape without engine state: %s", err)
        return self._last_state

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _engine_state(engine) -> dict:
    bm = engine.block_manager
    return {"running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
            "kv_usage": 1.0 - bm.num_free_blocks / max(1, bm.num_blocks), "prefix_hits": bm.prefix_hit_tokens,
            "preemptions": engine.scheduler.num_preemptions, "weight_version": engine.weight_version}


class _EngineStateCollector:
    def __init__(self, metrics: EngineMetrics):
        self.metrics = metrics

    def describe(self):
        return []     # collected only on scrape, never at registration

    def collect(self):
        state = self.metrics.state()
        if state is None:
            return
        model = [self.metrics.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(model, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(model, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in model execution batches.", state["running"])
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be admitted.", state["waiting"])
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", state["kv_usage"])
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (vLLM's older name).", state["kv_usage"])
        yield counter("vllm:prefix_cache_hits", "Prefix-cache hits, in prompt tokens found cached.",
                      state["prefix_hits"])
        yield counter("vllm:num_preemptions", "Preemptions by recompute.", state["preemptions"])
        yield gauge("tandem:weight_version", "The weight version in force.", state["weight_version"])


def serve_metrics(metrics: EngineMetrics, host: str, port: int):
    """A standalone `/metrics` endpoint (when the HTTP front is off); returns (http server, thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=host, registry=metrics.registry)
