"""The PushWeights handler the gRPC servicer delegates to.

One push: check the credential (UNAUTHENTICATED and nothing read otherwise), stage the stream while
the engine keeps serving (serving.weights.stage), then ask the engine loop to swap it in under the drain
policy (serving.weights.swap) and answer with the version in force and the figures. A stream that is
cut off, malformed or fails its checksum changes nothing and the pusher gets the reason.

Two phases (what a balancer does across replicas): a push whose commit says `prepare_only` is staged and
checked, then held (one at a time, for at most PREPARED_TTL_S) and answered `prepared`; FinishPush(version,
commit) then swaps it in or drops it. A newer prepare replaces an older one, so staging memory stays bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from common.errors import FieldError
from protos import tandem_pb2
from protos.auth import PushAuth
from serving.engine.loop import EngineDead
from serving.weights.stage import WeightStage
from serving.weights.swap import WeightSwapper, WeightUpdater

log = logging.getLogger(__name__)

WAKE_S = 0.05   # how often a waiting push nudges the engine loop to check whether it has drained
PREPARED_TTL_S = 300.0   # a prepared push nobody finishes (its coordinator died) is dropped after this


class WeightPushHandler:
    """`push_weights(request_iterator, context, loop)`: the body of Generation.PushWeights."""

    def __init__(self, auth: PushAuth, swapper: WeightSwapper, max_origin_chars: int = 256):
        self.auth = auth
        self.swapper = swapper
        self.max_origin_chars = max_origin_chars
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._prepared = None               # (StagedUpdate, deadline) of a prepare_only push
        self._prepared_lock = threading.Lock()

    @classmethod
    def for_engine(cls, engine, auth: PushAuth, policy: str = "drain", swap_timeout_s: float = 30.0,
                   limits=None) -> WeightPushHandler:
        max_origin = limits.max_id_chars if limits is not None else 256
        return cls(auth, WeightSwapper(WeightUpdater(engine), policy, swap_timeout_s), max_origin_chars=max_origin)

    def push_weights(self, request_iterator, context: grpc.ServicerContext, loop) -> tandem_pb2.PushResult:
        self.auth.check(context)
        try:
            if self._shapes is None:
                self._shapes = loop.call(lambda engine: engine.runner.hf_parameter_shapes(), timeout=60.0)
            version = loop.call(lambda engine: engine.weight_version, timeout=60.0)
        except EngineDead as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        stage = WeightStage(self._shapes, version, conv1d=loop.engine.info.architecture == "gpt2",
                            max_origin_chars=self.max_origin_chars)
        messages = iter(request_iterator)
        prepare_only = False
        while True:
            try:
                message = next(messages)
            except StopIteration:
                break
            except Exception:  # noqa: BLE001 - the client cancelled or the stream broke mid-push
                log.warning("weight push cut off after %d tensors; nothing applied",
                            stage.update.num_tensors if stage.update else 0)
                context.abort(grpc.StatusCode.CANCELLED, "the push stream was cut off; nothing applied")
            try:
                stage.feed(message)
            except FieldError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err}; nothing applied")
            prepare_only = prepare_only or (message.WhichOneof("kind") == "commit" and message.commit.prepare_only)
        try:
            update = stage.result()
        except FieldError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if prepare_only:
            with self._prepared_lock:
                self._prepared = (update, time.monotonic() + PREPARED_TTL_S)
            log.info("weight push v%d staged and checked; held until FinishPush", update.version)
            return tandem_pb2.PushResult(version=version, bytes_received=update.bytes_received,
                                         tensors=update.num_tensors, stage_s=update.stage_s, prepared=True)
        result = self._swap(update, context, loop)
        return tandem_pb2.PushResult(version=result.version, bytes_received=update.bytes_received,
                                     tensors=update.num_tensors, stage_s=update.stage_s, swap_s=result.swap_s)

    def finish_push(self, request: tandem_pb2.FinishPushRequest, context: grpc.ServicerContext,
                    loop) -> tandem_pb2.PushResult:
        """Phase two: swap in (commit) or drop the prepared push of `request.version`."""
        self.auth.check(context)
        with self._prepared_lock:
            if self._prepared is not None and self._prepared[1] < time.monotonic():
                self._prepared = None                        # expired: as if never prepared
            update = self._prepared[0] if self._prepared is not None else None
            if update is not None and update.version == request.version:
                self._prepared = None
            else:
                update = None
        if update is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"version: no prepared push of version {request.version}; nothing applied")
        if not request.commit:
            log.info("prepared weight push v%d dropped", update.version)
            version = loop.call(lambda engine: engine.weight_version, timeout=60.0)
            return tandem_pb2.PushResult(version=version, tensors=update.num_tensors)
        result = self._swap(update, context, loop)
        return tandem_pb2.PushResult(version=result.version, bytes_received=update.bytes_received,
                                     tensors=update.num_tensors, stage_s=update.stage_s, swap_s=result.swap_s)

    def _swap(self, update, context, loop):
        future = self.swapper.request(update)
        context.add_callback(lambda: self.swapper.withdraw(future))   # a pusher gone before the swap
        while True:
            try:
                loop.call(self.swapper.before_step, timeout=60.0)   # swaps now if the engine is idle
                return future.result(timeout=WAKE_S)
            except FutureTimeout:
                continue
            except CancelledError:
                context.abort(grpc.StatusCode.CANCELLED, "the push was withdrawn before the swap; nothing applied")
            except FieldError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err}; nothing applied")
            except EngineDead as err:
                self.swapper.withdraw(future)
                context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
            finally:
                if not context.is_active():
                    self.swapper.withdraw(future)
