"""Pushing weights to a running server: full HF folders, LoRA adapter folders, or (name, tensor) iterators.

    report = push_weights("127.0.0.1:50051", hf_tensors("ckpt/"), token=token, encoding="int8")

The tensors are streamed one at a time (`header → chunks → commit{checksum}`), so a learner can feed
ZeRO-3 parameters as it gathers them without holding the model on one rank. The checksum is taken over
the values the server will decode (quantized ones included), so both sides agree bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from clients.results import TandemError
from common.errors import FieldError
from protos import tandem_pb2, tandem_pb2_grpc
from protos.auth import bearer_metadata
from protos.codec import DEFAULT_CHUNK_BYTES, ENCODINGS, Checksum, TensorAssembler, encode_tensor

NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass
class PushReport:
    version: int            # the version now in force on the server
    tensors: int
    encoding: str
    bytes_sent: int         # serialized messages on the wire
    bytes_received: int     # as the server counted them
    stage_s: float          # server: receiving, decoding and checking while it kept serving
    swap_s: float           # server: the pause between two steps
    push_s: float           # client: wall time of the whole call


def hf_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every weight in a local HF checkpoint folder, one file at a time."""
    from common.checkpoint import iter_checkpoint

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FieldError("checkpoint", f"{path} is not a HF model folder (no config.json)")
    yield from iter_checkpoint(path)


def lora_adapter(folder: str | Path) -> tuple[list[tuple[str, torch.Tensor]], float]:
    """The adapter tensors of a peft folder (adapter_config.json + adapter_model.safetensors) and their scale."""
    from safetensors.torch import load_file

    path = Path(folder)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FieldError("checkpoint", f"{path} is not a LoRA adapter folder (needs adapter_config.json and "
                                       f"adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not rank or alpha is None:
        raise FieldError("checkpoint", f"{config_file} lacks r / lora_alpha")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise FieldError("checkpoint", "per-module rank_pattern / alpha_pattern adapters are not supported")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = [(n, t) for n, t in load_file(str(weights_file)).items() if ".lora_" in n]
    if not tensors:
        raise FieldError("checkpoint", f"{weights_file} holds no lora_A / lora_B tensors")
    return tensors, float(scale)


def weight_messages(named_tensors: NamedTensors, version: int, *, origin: str = "", encoding: str = "float32",
                    block_size: int = 256, lora: bool = False, lora_scale: float = 0.0, num_tensors: int = 0,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES, commit: bool = True) -> Iterator[tandem_pb2.WeightChunk]:
    """The messages of one push. `commit=False` leaves the commit out (a cut-off push, for tests)."""
    if encoding not in ENCODINGS:
        raise FieldError("encoding", f"must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    yield tandem_pb2.WeightChunk(header=tandem_pb2.WeightHeader(
        version=version, origin=origin, lora=lora, lora_scale=lora_scale, num_tensors=num_tensors))
    digest = Checksum()
    for name, tensor in named_tensors:
        decoded = TensorAssembler(name, tuple(tensor.shape), encoding)
        for chunk in encode_tensor(name, tensor, encoding, block_size, chunk_bytes):
            decoded.add(chunk)
            yield tandem_pb2.WeightChunk(tensor=chunk)
        digest.update(name, decoded.tensor())
    if commit:
        yield tandem_pb2.WeightChunk(commit=tandem_pb2.WeightCommit(checksum=digest.hexdigest()))


def _channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    return grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)


def current_version(target: str, timeout: float | None = 10.0,
                    credentials: grpc.ChannelCredentials | None = None) -> int:
    """The weight version in force on the server (GetStatus)."""
    with _channel(target, credentials) as channel:
        try:
            status = tandem_pb2_grpc.GenerationStub(channel).GetStatus(tandem_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise TandemError.from_rpc(target, err) from None
    return status.weight_version


def push_weights(target: str, named_tensors: NamedTensors, *, token: str | None, version: int | None = None,
                 origin: str = "", encoding: str = "float32", block_size: int = 256, lora: bool = False,
                 lora_scale: float = 0.0, num_tensors: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 timeout: float | None = None, credentials: grpc.ChannelCredentials | None = None) -> PushReport:
    """Stream the tensors to `target` as one versioned update (version: the server's + 1 when None).

    Raises TandemError with the server's status (UNAUTHENTICATED, INVALID_ARGUMENT naming the tensor, ...);
    when the server refuses a push, nothing of it is in force.
    """
    if version is None:
        version = current_version(target, credentials=credentials) + 1
    sent = [0]
    failure: list[BaseException] = []

    def counted() -> Iterator[tandem_pb2.WeightChunk]:
        try:
            for message in weight_messages(named_tensors, version, origin=origin, encoding=encoding,
                                           block_size=block_size, lora=lora, lora_scale=lora_scale,
                                           num_tensors=num_tensors, chunk_bytes=chunk_bytes):
                sent[0] += message.ByteSize()
                yield message
        except BaseException as err:   # surfaced after the call: gRPC only sees a cancelled stream
            failure.append(err)
            raise

    started = time.perf_counter()
    with _channel(target, credentials) as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        try:
            result = stub.PushWeights(counted(), timeout=timeout, metadata=bearer_metadata(token))
        except grpc.RpcError as err:
            if failure:
                raise failure[0] from None
            raise TandemError.from_rpc(target, err) from None
    return PushReport(version=result.version, tensors=result.tensors, encoding=encoding, bytes_sent=sent[0],
                      bytes_received=result.bytes_received, stage_s=result.stage_s, swap_s=result.swap_s,
                      push_s=time.perf_counter() - started)


_END, _ABORT = object(), object()


class StreamingPush:
    """One push fed tensor by tensor from the caller's thread, e.g. while gathering ZeRO-3 parameters:

        with StreamingPush(target, token=token, version=v, origin="ppo step 3") as push:
            for name, param in model.named_parameters():
                with deepspeed.zero.GatheredParameters([param]):
                    push.send(name, param)            # copied to the CPU; at most `max_queued` wait
            report = push.commit()

    The gRPC call runs on a helper thread; leaving the block without commit() (or abort()) cuts the
    stream off, so the server applies nothing. A refusal (bad name, shape, token) raises at the next send.
    """

    def __init__(self, target: str, *, token: str | None, version: int | None = None, max_queued: int = 2,
                 **options):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_queued))
        self._report: PushReport | None = None
        self._error: BaseException | None = None
        version = current_version(target, credentials=options.get("credentials")) + 1 if version is None else version
        self._thread = threading.Thread(target=self._run, args=(target, token, version, options),
                                        name="weight-push", daemon=True)
        self._thread.start()

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise RuntimeError("push aborted by the sender")
            yield item

    def _run(self, target, token, version, options) -> None:
        try:
            self._report = push_weights(target, self._tensors(), token=token, version=version, **options)
        except BaseException as err:  # noqa: BLE001 - handed to the sender's thread
            self._error = err

    def _put(self, item) -> None:
        import queue

        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
        raise RuntimeError("the push has already ended")

    def send(self, name: str, tensor: torch.Tensor) -> None:
        self._put((name, tensor.detach().to("cpu", copy=True)))

    def commit(self) -> PushReport:
        """Send the commit and wait for the server's answer (the version in force)."""
        self._put(_END)
        self._thread.join()
        if self._report is None:
            self._raise()
        return self._report

    def abort(self) -> None:
        if self._thread.is_alive():
            try:
                self._put(_ABORT)
            except BaseException:  # noqa: BLE001 - already ended
                pass
            self._thread.join()

    def __enter__(self) -> StreamingPush:
        return self

    def __exit__(self, *exc) -> None:
        if self._report is None:
            self.abort()
