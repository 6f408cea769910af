"""Raw record readers: JSON arrays, JSON Lines and plain text, optionally gzipped, from a file or a folder.

Readers never raise on a bad record: they yield `(record, None)` for a good one and `(None, reason)` for
one that could not be parsed, so the adapter above can count it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".text", ".md")


def open_text(path: Path):
    """Open a (possibly gzipped) UTF-8 text file."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def data_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The file itself, or the folder's files with one of `suffixes` (recursively, sorted for determinism)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def read_json_records(path: Path) -> Iterator[tuple[dict | None, str | None]]:
    """Records of a JSON Lines file, or of a JSON file holding a list (or {"data": [...]})."""
    with open_text(path) as f:
        if path.name.endswith((".json", ".json.gz")):
            try:
                doc = json.load(f)
            except json.JSONDecodeError:
                yield None, "invalid json"
                return
            items = doc.get("data", doc.get("train")) if isinstance(doc, dict) else doc
            if not isinstance(items, list):
                yield None, "invalid json"
                return
            for item in items:
                yield (item, None) if isinstance(item, dict) else (None, "not an object")
            return
        for line in f:
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                yield None, "invalid json"
                continue
            yield (item, None) if isinstance(item, dict) else (None, "not an object")


def read_text_records(path: Path) -> Iterator[str]:
    """Plain text: one record per blank-line-separated paragraph when the file has blank lines, else per line."""
    with open_text(path) as f:
        text = f.read()
    lines = text.splitlines()
    if any(not line.strip() for line in lines):
        paragraph: list[str] = []
        for line in lines + [""]:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    else:
        yield from lines


def first_record(path: Path) -> dict | None:
    """The first JSON object in a file or folder (for auto-detection), or None for non-JSON data."""
    for file in data_files(path, JSON_SUFFIXES):
        if not file.name.endswith(JSON_SUFFIXES):
            return None
        try:
            for record, _ in read_json_records(file):
                if record is not None:
                    return record
        except (UnicodeDecodeError, OSError):
            return None
    return None
