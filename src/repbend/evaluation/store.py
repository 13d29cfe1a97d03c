"""Append-only, crash-tolerant JSONL cache of evaluation work (completions, attack artefacts).

Every completion an evaluation produces is written here the moment its batch finishes, so a killed
run resumes without regenerating anything. Records are looked up by a key that hashes everything
that determines the output: the model fingerprint, the attack and its variant, the messages, the
prefill, the generation settings and the sample index (:func:`completion_key`). Attacks with costly
intermediate results (a GCG suffix, a learned soft prompt) can store those too, under a key of
their own built with :func:`make_key`.

File format: one JSON object per line, ``{"key": "<sha256>", ...record}``. A half-written last line
(the process died mid-write) is dropped on open and the file is cut back to the last full line, so
later appends stay valid JSON. When a key is written twice the later record wins.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from repbend.errors import RepbendError
from repbend.evaluation.types import GenSettings


def make_key(*parts: Any) -> str:
    """Stable sha256 of JSON-serialisable ``parts`` (dict key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def completion_key(*, fingerprint: str, attack: str, variant: str, messages: list[dict], prefill: str,
                   settings: GenSettings, sample: int) -> str:
    """Cache key of one generated sample: identical inputs give the same key, anything else differs."""
    return make_key("completion", fingerprint, attack, variant, messages, prefill, settings.key(), sample)


class Store:
    """``get(key) -> dict | None`` and ``put(key, record)`` over one append-only JSONL file.

    ``put_many`` writes several records with a single flush+fsync (one call per generated batch).
    The whole file is indexed in memory on open; it holds text only, so this stays small.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, dict] = {}
        self.dropped_tail = False
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = len(data)
        if data and not data.endswith(b"\n"):
            end = data.rfind(b"\n") + 1  # 0 when the only line is partial
        for lineno, raw in enumerate(data[:end].splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RepbendError(f"Cache file {self.path} line {lineno} is corrupt; delete that line "
                                   f"(or the file, to regenerate everything) and run again.") from None
            if isinstance(row, dict) and isinstance(row.get("key"), str):
                self._index[row["key"]] = row
        if end < len(data):  # crash mid-write: cut the partial line so appends stay valid
            self.dropped_tail = True
            with self.path.open("r+b") as f:
                f.truncate(end)

    def get(self, key: str) -> dict | None:
        """The record stored under ``key`` (including its ``"key"`` field), or ``None``."""
        return self._index.get(key)

    def put(self, key: str, record: dict) -> None:
        """Store one record durably (appended, flushed and fsynced before returning)."""
        self.put_many([(key, record)])

    def put_many(self, items: list[tuple[str, dict]]) -> None:
        """Store several records with one write + fsync."""
        if not items:
            return
        rows = [{**record, "key": key} for key, record in items]
        text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            self._index[row["key"]] = row

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def records(self) -> Iterator[dict]:
        """Every stored record (latest per key), in first-written order."""
        return iter(self._index.values())
