"""Metrics: the JSONL log, TensorBoard event files decoded by the real protobuf runtime, and the PNG plots."""

from __future__ import annotations

import struct

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from learner.metrics import MetricsLogger, read_metrics
from learner.plot import plot_run
from learner.tb_writer import crc32c, read_records


def event_class():
    """TensorFlow's Event / Summary / Summary.Value messages (the fields we write), built from descriptors."""
    f = descriptor_pb2.FileDescriptorProto(name="tb_event_test.proto", package="tbtest", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto
    value = f.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=T.TYPE_FLOAT, label=T.LABEL_OPTIONAL)
    summary = f.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=T.TYPE_MESSAGE, type_name=".tbtest.Value", label=T.LABEL_REPEATED)
    event = f.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=T.TYPE_DOUBLE, label=T.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=T.TYPE_INT64, label=T.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=T.TYPE_MESSAGE, type_name=".tbtest.Summary", label=T.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283        # the standard CRC-32C check value
    assert crc32c(b"") == 0 and crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4


def test_metrics_logger_writes_jsonl_and_tensorboard_events(tmp_path):
    with MetricsLogger(tmp_path / "run", rank=0) as m:
        m.log(1, loss=2.5, accuracy=0.25)
        m.log(2, loss=1.25, reward=float("nan"))
        m.log(300, loss=0.5)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 300] and [r["loss"] for r in rows] == [2.5, 1.25, 0.5]
    assert rows[1]["reward"] is None and rows[0]["accuracy"] == 0.25

    (events,) = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    Event = event_class()
    decoded = [Event.FromString(payload) for payload in read_records(events)]
    assert decoded[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in decoded[1:] for v in e.summary.value]
    assert scalars == [(1, "loss", 2.5), (1, "accuracy", 0.25), (2, "loss", 1.25), (300, "loss", 0.5)]
    # a flipped byte is caught by the record CRC
    data = bytearray(events.read_bytes())
    data[-6] ^= 0xFF
    events.write_bytes(bytes(data))
    try:
        read_records(events)
        raise AssertionError("corruption not detected")
    except ValueError as e:
        assert "CRC" in str(e)


def test_other_ranks_write_nothing_and_plot_draws_pngs(tmp_path):
    with MetricsLogger(tmp_path / "quiet", rank=1) as m:
        m.log(1, loss=1.0)
    assert not (tmp_path / "quiet").exists()
    for step_name in ("sft", "reward"):
        with MetricsLogger(tmp_path / "run" / step_name, rank=0) as m:
            for step in range(1, 6):
                m.log(step, loss=1.0 / step, lr=1e-3)
    written = plot_run(tmp_path / "run")
    assert sorted(p.parent.name for p in written) == ["reward", "sft"]
    for png in written:
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width > 200 and height > 200
