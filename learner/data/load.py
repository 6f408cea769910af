"""load_dataset(spec): read one dataset into unified Samples, counting bad records per reason.

Specs: "hh-rlhf:PATH", "dschat:PATH", "alpaca:PATH", "text:PATH", "embedded" / "embedded:N", or a bare
PATH whose format is detected from its first record. PATH is a file or a folder of .jsonl/.json
(optionally .gz) or text files.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ConfigError
from learner.data.adapters import ADAPTERS, detect_kind
from learner.data.readers import (
    JSON_SUFFIXES,
    TEXT_SUFFIXES,
    data_files,
    first_record,
    read_json_records,
    read_text_records,
)
from learner.data.sample import Sample

log = logging.getLogger(__name__)

KINDS = (*ADAPTERS, "embedded")


@dataclass
class DataReport:
    """What was read: `total` records, `kept` usable ones, and the rest counted by reason."""

    name: str
    total: int = 0
    kept: int = 0
    bad: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        bad = ", ".join(f"{n} {reason}" for reason, n in sorted(self.bad.items())) or "none"
        return f"{self.name}: kept {self.kept} of {self.total} records (bad: {bad})"


@dataclass
class LoadedDataset:
    name: str
    samples: list[Sample]
    report: DataReport


def parse_spec(spec: str) -> tuple[str, str]:
    """(kind, path) of a spec; kind "" means auto-detect. Raises ConfigError("data") for a bad spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("data", f"empty dataset spec {spec!r}")
    kind, sep, rest = spec.partition(":")
    if kind == "embedded":
        if rest and not (rest.isdigit() and int(rest) > 0):
            raise ConfigError("data", f"{spec!r}: embedded:N needs a positive number of samples")
        return "embedded", rest
    if sep and kind in ADAPTERS:
        path = rest
    elif sep and not Path(spec).exists() and "/" not in kind and len(kind) > 1:
        raise ConfigError("data", f"{spec!r}: unknown dataset kind {kind!r} (known: {', '.join(KINDS)})")
    else:
        kind, path = "", spec
    if not Path(path).expanduser().exists():
        raise ConfigError("data", f"{spec!r}: no such file or folder {path!r}")
    return kind, str(Path(path).expanduser())


def load_dataset(spec: str) -> LoadedDataset:
    """Read one dataset spec. Bad records are counted (and logged), never fatal; no usable record is."""
    kind, path = parse_spec(spec)
    if kind == "embedded":
        raise ConfigError("data", f"{spec!r}: the embedded task is generated, not read: use learner.inputs.read_dataset")
    root = Path(path)
    if not kind:
        kind = detect_kind(first_record(root))
        if not kind:
            raise ConfigError("data", f"{spec!r}: cannot tell the format from the first record's keys; "
                                      f"prefix the path with one of {', '.join(ADAPTERS)}:")
    adapter, source = ADAPTERS[kind], f"{kind}:{root.name}"
    samples: list[Sample] = []
    bad: Counter[str] = Counter()
    total = 0
    files = data_files(root, JSON_SUFFIXES + (TEXT_SUFFIXES if kind == "text" else ()))
    for file in files:
        if kind == "text" and not file.name.endswith(JSON_SUFFIXES):
            records = ((r, None) for r in read_text_records(file))
        else:
            records = read_json_records(file)
        try:
            for record, reason in records:
                total += 1
                sample, reason = (None, reason) if reason else adapter(record, source)
                if sample is None:
                    bad[reason] += 1
                else:
                    samples.append(sample)
        except (UnicodeDecodeError, OSError, EOFError) as e:
            bad[f"unreadable file ({type(e).__name__})"] += 1
            log.warning("data %s: cannot read %s: %s", spec, file, e)
    report = DataReport(spec, total=total, kept=len(samples), bad=dict(bad))
    if bad:
        log.warning("data %s", report)
    else:
        log.info("data %s", report)
    if not samples:
        raise ConfigError("data", f"{spec!r}: no usable records ({report})")
    return LoadedDataset(spec, samples, report)
