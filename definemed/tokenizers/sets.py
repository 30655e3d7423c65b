"""Stream the text sets in batches: Parquet documents (row groups read one batch at a time) and parallel JSONL
sentences (line by line). Nothing holds a set in memory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from definemed.data.loaders import MissingColumnError, SourceError, fs_path, resolve_files
from definemed.tokenizers.config import DocumentSet, ParallelSet


def _parquet(path: str):
    files, fs = resolve_files(path, (".parquet",))
    import pyarrow.parquet as pq

    for f in files:
        fh = fs.open(fs_path(f, fs), "rb") if fs is not None else open(f, "rb")
        with fh:
            yield f, pq.ParquetFile(fh)


def check_document_set(s: DocumentSet) -> int:
    """Columns present in every file (a MissingColumnError names the first absent one); rows before `where`."""
    rows = 0
    for f, pf in _parquet(s.path):
        names = pf.schema_arrow.names
        for col in [s.text_column, *s.where]:
            if col not in names:
                raise MissingColumnError(col, f, names)
        rows += pf.metadata.num_rows
    return rows


def iter_documents(s: DocumentSet, batch_size: int) -> Iterator[list[str]]:
    """Batches of non-empty texts of the rows that match `where`, up to `limit` texts."""
    import pyarrow.compute as pc

    left = s.limit if s.limit is not None else float("inf")
    for _, pf in _parquet(s.path):
        for batch in pf.iter_batches(batch_size=batch_size, columns=[s.text_column, *s.where]):
            mask = None
            for col, value in s.where.items():
                m = pc.equal(batch.column(col), value)
                mask = m if mask is None else pc.and_(mask, m)
            if mask is not None:
                batch = batch.filter(mask)
            texts = [t for t in batch.column(s.text_column).to_pylist() if t]
            if len(texts) > left:
                texts = texts[: int(left)]
            if texts:
                yield texts
            left -= len(texts)
            if left <= 0:
                return


def iter_pairs(s: ParallelSet, batch_size: int) -> Iterator[tuple[list[str], list[str]]]:
    """Batches of (German sentences, their translations); a row without both sides, or a repeated id, is an error
    naming the line."""
    seen: set[str] = set()
    src: list[str] = []
    ref: list[str] = []
    n = 0
    with open(Path(s.path), encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{s.path}:{ln}: not valid JSON ({e.msg})") from None
            rid = str(row.get("id", ""))
            a, b = row.get(s.lang), row.get(s.reference_lang)
            if not rid or not isinstance(a, str) or not a.strip() or not isinstance(b, str) or not b.strip():
                raise SourceError(f"{s.path}:{ln}: a pair needs a non-empty id, '{s.lang}' and '{s.reference_lang}'")
            if rid in seen:
                raise SourceError(f"{s.path}:{ln}: duplicate id {rid!r}")
            seen.add(rid)
            src.append(a)
            ref.append(b)
            n += 1
            if len(src) >= batch_size:
                yield src, ref
                src, ref = [], []
            if s.limit is not None and n >= s.limit:
                break
    if src:
        yield src, ref
    if n == 0:
        raise SourceError(f"{s.path}: no sentence pairs")
