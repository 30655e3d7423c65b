"""Append-only JSONL record cache: the resume mechanism of generation and judging.

A record is written (and fsynced) the moment its request finishes, so a killed run loses at most the requests
in flight. A torn last line from a kill is ignored on load; that request simply runs again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


def stable_key(*parts: Any) -> str:
    """Content key: the same request (model, prompt text, parameters, ...) always maps to the same key."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


class JsonlCache:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        torn = 0
        with self.path.open("r", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    torn += 1
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self._records[rec["key"]] = rec
        if torn:
            log.warning("%s: ignored %d torn line(s) from an interrupted run", self.path, torn)
        # Rewrite without torn lines so the next append does not glue onto a half line.
        if torn or (self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")):
            from definemed.io import atomic_write_text

            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                 for r in self._records.values()))

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(key)

    def values(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._records.values()))

    def put(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._records[record["key"]] = record
