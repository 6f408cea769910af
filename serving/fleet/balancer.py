"""One gRPC address in front of several generation servers (replicas), in the style of MII's load balancer.

Routing: each Generate / GenerateStream / StreamExperience / GetStatus call goes to the healthy replica
with the fewest calls in flight through this balancer (ties broken round-robin). Messages are relayed
as raw bytes: the balancer never decodes a request, so it adds one hop and no (de)serialisation.

Failures: a health-check thread asks every replica's standard health service twice a second; a replica that
does not answer SERVING is out of rotation until it does again (a call that fails with UNAVAILABLE takes its
replica out at once); when no replica is healthy, calls still try each one once. A call that fails on a
replica with UNAVAILABLE (or CANCELLED while the client is still there) is retried on another replica when
nothing has been relayed to the client yet — always for unary calls, and for streams until their first
message; after that the client gets the error. Every other code passes through untouched: INTERNAL (a
replica's engine failed: the same request may fail the same way elsewhere), INVALID_ARGUMENT (the request
is bad everywhere), RESOURCE_EXHAUSTED (back-pressure or a limit: retrying elsewhere would only move load).

PushWeights: the credential is checked here first (UNAUTHENTICATED, and nothing read, without it); then the
pushed stream is relayed message by message to every healthy replica at once (with the caller's metadata, so
the credential travels), each through a queue of a few messages, so the balancer never holds a whole push. The
push runs in two phases: the commit goes out as `prepare_only`, so every replica stages and checks it and
applies nothing; only when all have prepared does each get FinishPush(commit); if any refused, the others get
FinishPush(abort) and the caller gets the first refusal, naming the replica. So replicas never serve different
versions after a push (a commit that fails after others succeeded, e.g. out of memory while writing, is
reported as INTERNAL naming the replica). A push cut off mid-stream is cut off on every replica (each applies
nothing). The balancer's own health service reports SERVING while at least one replica is healthy.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import ConfigError
from protos import tandem_pb2
from protos.auth import PushAuth, ServerTLS, add_port, channel_credentials, open_channel
from protos.names import SERVICE_NAME, reflected_services

log = logging.getLogger(__name__)

ROUTED_UNARY = ("Generate", "GetStatus")
ROUTED_STREAM = ("GenerateStream", "StreamExperience")
RETRIABLE = {grpc.StatusCode.UNAVAILABLE}
PUSH_QUEUE = 8                         # messages of a push waiting for one replica
_END = object()
_HOP_HEADERS = ("user-agent", "grpc-", ":")


@dataclass
class BalancerConfig:
    backends: list[str]                # host:port of each replica
    host: str = "127.0.0.1"
    port: int = 50051                  # 0: pick a free port
    health_interval_s: float = 0.5
    health_timeout_s: float = 2.0
    max_concurrent_rpcs: int = 256
    max_message_bytes: int = 64 << 20
    push_token_file: str | None = None  # the PushWeights credential (else $TANDEM_PUSH_TOKEN; else pushes refused)
    tls: ServerTLS = field(default_factory=ServerTLS)   # the balancer's own front over TLS
    backend_tls_ca: str | None = None   # reach the replicas over TLS, trusting this CA (None: plaintext)

    def validate(self) -> BalancerConfig:
        if not self.backends:
            raise ConfigError("backends", "at least one replica address (host:port) is required")
        for address in self.backends:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError("backends", f"{address!r} is not host:port")
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError("port", f"must be in [0, 65535], got {self.port}")
        if not self.health_interval_s > 0:
            raise ConfigError("health_interval_s", f"must be > 0, got {self.health_interval_s}")
        self.tls.validate()
        if self.backend_tls_ca:
            channel_credentials(self.backend_tls_ca)
        return self


@dataclass
class Replica:
    address: str
    channel: grpc.Channel
    healthy: bool = False
    in_flight: int = 0
    served: int = 0                    # calls routed here (tests and logs read it)
    methods: dict = field(default_factory=dict)


class Balancer:
    """`start()` -> port, `stop()`; `replicas` shows rotation and load."""

    def __init__(self, config: BalancerConfig):
        self.config = config.validate()
        self.auth = PushAuth.from_sources(config.push_token_file)
        options = [("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", config.max_message_bytes)]
        backend_tls = channel_credentials(config.backend_tls_ca) if config.backend_tls_ca else None
        self.replicas = [self._replica(a, options, backend_tls) for a in config.backends]
        self.port = 0
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._stopping = threading.Event()
        self.health = health.HealthServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_concurrent_rpcs + 4,
                                                              thread_name_prefix="balancer"),
                                   options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        handlers = {m: grpc.unary_unary_rpc_method_handler(self._unary_handler(m)) for m in ROUTED_UNARY}
        handlers.update({m: grpc.unary_stream_rpc_method_handler(self._stream_handler(m)) for m in ROUTED_STREAM})
        handlers["PushWeights"] = grpc.stream_unary_rpc_method_handler(self._push)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(reflected_services(), self._server)   # the balancer imports tandem_pb2
        self._checker = threading.Thread(target=self._check_health, name="balancer-health", daemon=True)

    @staticmethod
    def _replica(address: str, options, credentials=None) -> Replica:
        channel = open_channel(address, credentials, options=options)
        path = f"/{SERVICE_NAME}/"
        methods = {m: channel.unary_unary(path + m) for m in ROUTED_UNARY}
        methods.update({m: channel.unary_stream(path + m) for m in ROUTED_STREAM})
        methods["PushWeights"] = channel.stream_unary(path + "PushWeights")
        methods["FinishPush"] = channel.unary_unary(path + "FinishPush",
                                                    request_serializer=tandem_pb2.FinishPushRequest.SerializeToString,
                                                    response_deserializer=tandem_pb2.PushResult.FromString)
        methods["Health"] = health_pb2_grpc.HealthStub(channel).Check
        return Replica(address, channel, methods=methods)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> int:
        self.port = add_port(self._server, f"{self.config.host}:{self.config.port}", self.config.tls)
        if self.port == 0:
            raise ConfigError("port", f"cannot bind {self.config.host}:{self.config.port}")
        self.probe_all()
        self._checker.start()
        self._server.start()
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        for replica in self.replicas:
            replica.channel.close()

    def healthy_count(self) -> int:
        with self._lock:
            return sum(r.healthy for r in self.replicas)

    # ---------------------------------------------------------------- health

    def _probe(self, replica: Replica) -> None:
        try:
            reply = replica.methods["Health"](health_pb2.HealthCheckRequest(service=""),
                                              timeout=self.config.health_timeout_s)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            ok = False
        self._set_healthy(replica, ok)

    def _set_healthy(self, replica: Replica, ok: bool) -> None:
        with self._lock:
            changed = replica.healthy != ok
            replica.healthy = ok
            any_healthy = any(r.healthy for r in self.replicas)
        if changed:
            log.log(logging.INFO if ok else logging.WARNING, "replica %s is %s", replica.address,
                    "in rotation" if ok else "out of rotation")
        status = health_pb2.HealthCheckResponse.SERVING if any_healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        if not self._stopping.is_set():
            for name in ("", SERVICE_NAME):
                self.health.set(name, status)

    def probe_all(self) -> None:
        for replica in self.replicas:
            self._probe(replica)

    def _check_health(self) -> None:
        while not self._stopping.wait(self.config.health_interval_s):
            self.probe_all()

    # ---------------------------------------------------------------- routing

    def _acquire(self, tried: set[str]) -> Replica | None:
        """The least-loaded healthy replica not tried yet (its in-flight count taken); when none is healthy,
        any replica not tried yet (a missed health check may only mean a busy machine); else None."""
        with self._lock:
            untried = [r for r in self.replicas if r.address not in tried]
            candidates = [r for r in untried if r.healthy] or untried
            if not candidates:
                return None
            turn = next(self._turn)
            n = len(self.replicas)
            best = min(candidates, key=lambda r: (r.in_flight, (self.replicas.index(r) - turn) % n))
            best.in_flight += 1
            best.served += 1
            return best

    def _release(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    def _retriable(self, err: grpc.RpcError, context, replica: Replica) -> bool:
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            self._set_healthy(replica, False)
        return context.is_active() and (code in RETRIABLE or code == grpc.StatusCode.CANCELLED)

    def _no_replica(self, context, last: grpc.RpcError | None) -> None:
        if last is not None:
            context.abort(last.code(), f"{last.details()} (after trying every healthy replica)")
        context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy replica behind this balancer")

    def _unary_handler(self, method: str):
        def handle(request: bytes, context):
            tried: set[str] = set()
            last = None
            while (replica := self._acquire(tried)) is not None:
                tried.add(replica.address)
                call = replica.methods[method].future(request, timeout=_remaining(context),
                                                      metadata=_forwarded(context))
                context.add_callback(call.cancel)
                try:
                    return call.result()
                except grpc.RpcError as err:
                    if not self._retriable(err, context, replica):
                        context.abort(err.code(), err.details())
                    log.warning("%s failed on %s (%s); retrying elsewhere", method, replica.address, err.code().name)
                    last = err
                finally:
                    self._release(replica)
            self._no_replica(context, last)
        return handle

    def _stream_handler(self, method: str):
        def handle(request: bytes, context):
            tried: set[str] = set()
            last = None
            while (replica := self._acquire(tried)) is not None:
                tried.add(replica.address)
                call = replica.methods[method](request, timeout=_remaining(context), metadata=_forwarded(context))
                context.add_callback(call.cancel)
                relayed = False
                try:
                    for message in call:
                        relayed = True
                        yield message
                    return
                except grpc.RpcError as err:
                    if relayed or not self._retriable(err, context, replica):
                        context.abort(err.code(), err.details())
                    log.warning("%s failed on %s before its first message (%s); retrying elsewhere",
                                method, replica.address, err.code().name)
                    last = err
                finally:
                    self._release(replica)
            self._no_replica(context, last)
        return handle

    def _push(self, request_iterator, context):
        self.auth.check(context)                  # before a single message is read
        with self._lock:
            targets = [r for r in self.replicas if r.healthy]
        if not targets:
            self._no_replica(context, None)
        feeds = [queue.Queue(maxsize=PUSH_QUEUE) for _ in targets]
        calls = [(r, r.methods["PushWeights"].future(_drain(feed), timeout=_remaining(context),
                                                     metadata=_forwarded(context))) for r, feed in zip(targets, feeds)]
        version = 0
        try:
            for message in request_iterator:             # raw bytes: relayed as they came, but read
                try:
                    chunk = tandem_pb2.WeightChunk.FromString(message)
                except DecodeError:
                    for _, call in calls:
                        call.cancel()
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push message is not a WeightChunk; "
                                                                    "nothing applied")
                kind = chunk.WhichOneof("kind")
                if kind == "header":
                    version = chunk.header.version
                elif kind == "commit":                    # phase one: every replica stages and checks
                    message = tandem_pb2.WeightChunk(commit=tandem_pb2.WeightCommit(
                        checksum=chunk.commit.checksum, prepare_only=True)).SerializeToString()
                for feed, (_, call) in zip(feeds, calls):
                    _offer(feed, message, call)
        except Exception:  # noqa: BLE001 - the pusher's stream broke: cut every replica's stream off too
            for _, call in calls:
                call.cancel()
            context.abort(grpc.StatusCode.CANCELLED, "the push stream was cut off; nothing applied")
        for feed, (_, call) in zip(feeds, calls):
            _offer(feed, _END, call)
        prepared, refused = [], None
        for replica, call in calls:
            try:
                call.result()
                prepared.append(replica)
            except grpc.RpcError as err:
                refused = refused or (replica, err)
        finish = functools.partial(self._finish, version=version, metadata=_forwarded(context),
                                   timeout=_remaining(context))
        if refused is not None:                           # phase two, abort: no replica applies anything
            for replica in prepared:
                finish(replica, commit=False)
            replica, err = refused
            context.abort(err.code(), f"replica {replica.address}: {err.details()} (no replica applied it)")
        results, failed = [], []
        for replica in prepared:                          # phase two, commit: every replica swaps it in
            try:
                results.append(finish(replica, commit=True))
            except grpc.RpcError as err:
                failed.append(f"{replica.address}: {err.code().name}: {err.details()}")
        if failed:
            log.error("weight push v%d committed on %d of %d replicas; failed on %s", version, len(results),
                      len(prepared), "; ".join(failed))
            context.abort(grpc.StatusCode.INTERNAL, f"v{version} committed on {len(results)} of {len(prepared)} "
                                                    f"replicas; failed on {'; '.join(failed)}")
        return results[0].SerializeToString()

    def _finish(self, replica: Replica, *, version: int, commit: bool, metadata, timeout):
        return replica.methods["FinishPush"](tandem_pb2.FinishPushRequest(version=version, commit=commit),
                                             timeout=timeout, metadata=metadata)


def _drain(feed: queue.Queue):
    while (message := feed.get()) is not _END:
        yield message


def _offer(feed: queue.Queue, item, call) -> None:
    """Queue `item` for one replica's push, unless that call has already ended (it reads no more)."""
    while not call.done():
        try:
            feed.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def _remaining(context) -> float | None:
    """The caller's deadline as a timeout (None when it set none: gRPC reports a huge number then)."""
    left = context.time_remaining()
    return None if left is None or left > 1e6 else left


def _forwarded(context) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata minus hop-by-hop entries (so e.g. the push credential reaches the replicas)."""
    return tuple((k, v) for k, v in context.invocation_metadata() if not k.startswith(_HOP_HEADERS))
