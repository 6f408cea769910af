"""A TensorBoard event-file writer for scalars, with no tensorflow or tensorboard package.

An event file is a sequence of TFRecords: uint64 length, uint32 masked CRC-32C of the length, the
payload, uint32 masked CRC-32C of the payload (all little-endian). Each payload is an `Event` protobuf
(wall_time = 1: double, step = 2: int64, file_version = 3: string, summary = 5: Summary), and a
`Summary` holds repeated `Value` (tag = 1: string, simple_value = 2: float). We encode those few fields
by hand.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative ints
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """An Event protobuf with either a file_version or a summary of simple scalar values."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items())
        out += _field_bytes(5, summary)
    return out


def frame(payload: bytes) -> bytes:
    """One TFRecord."""
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc(header)) + payload + struct.pack("<I", masked_crc(payload))


def read_records(path: str | Path) -> list[bytes]:
    """The payloads of a TFRecord file, checking both CRCs (raises ValueError on corruption)."""
    data, out, pos = Path(path).read_bytes(), [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if crc != masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        payload = data[pos + 12:pos + 12 + length]
        (crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if crc != masked_crc(payload):
            raise ValueError(f"{path}: bad payload CRC at byte {pos}")
        out.append(payload)
        pos += 16 + length
    return out


class EventFileWriter:
    """Appends scalar summaries to `<log_dir>/events.out.tfevents.<time>.<host>`, readable by TensorBoard."""

    def __init__(self, log_dir: str | Path):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = Path(log_dir) / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._file.write(frame(encode_event(now, 0, file_version="brain.Event:2")))
        self._file.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._file.write(frame(encode_event(time.time(), step, scalars=scalars)))
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
