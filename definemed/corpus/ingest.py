"""Ingest: stream web documents through Ray Data and divert malformed rows to a quarantine Parquet.

Nothing is dropped silently: each malformed row is written, with every source column preserved (as JSON) and a
`reason`, to `<quarantine_dir>/part-<content hash>.parquet`. The file name is a hash of the rows, so a retried
Ray task or a resumed run rewrites the same file instead of adding a duplicate.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from definemed.corpus.malformed import REASONS, as_text, malformed_reason
from definemed.corpus.malformed import is_missing as _is_missing

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

    from definemed.data.loaders import WebSourceConfig

QUARANTINE_COLUMNS = ("id", "reason", "text", "text_type", "row_json")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, bytes):
        return {"__bytes_hex__": v.hex()}
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def split_batch(df: "pd.DataFrame", max_chars: int) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """(good rows, quarantine rows with QUARANTINE_COLUMNS)."""
    import pandas as pd

    ids = df["id"] if "id" in df.columns else pd.Series([None] * len(df), index=df.index)
    reasons = [malformed_reason(t, i, max_chars) for t, i in zip(df["text"], ids)]
    bad_mask = pd.Series([r is not None for r in reasons], index=df.index)
    bad = df[bad_mask]
    q = pd.DataFrame({
        "id": [None if i is None or _is_missing(i) else str(i) for i in ids[bad_mask]],
        "reason": [r for r in reasons if r is not None],
        "text": [as_text(t)[0] if as_text(t)[0] is not None else (None if t is None else repr(t))
                 for t in bad["text"]],
        "text_type": [type(t).__name__ for t in bad["text"]],
        "row_json": [json.dumps({k: _jsonable(v) for k, v in row.items()}, ensure_ascii=False, default=str)
                     for row in bad.to_dict(orient="records")],
    }, columns=list(QUARANTINE_COLUMNS))
    good = df[~bad_mask].copy()
    good["text"] = [as_text(t)[0] for t in good["text"]]
    return good.reset_index(drop=True), q


def write_table(table, path: str) -> None:
    """Atomic for local paths; object stores (s3://, gs://) publish whole objects anyway."""
    if "://" in path and not path.startswith("file://"):
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        fs, p = pafs.FileSystem.from_uri(path)
        pq.write_table(table, p, filesystem=fs)
        return
    from definemed.io import write_parquet_atomic

    write_parquet_atomic(table, path.removeprefix("file://"))


def _write_quarantine(bad: "pd.DataFrame", quarantine_dir: str, name: str | None = None) -> None:
    import pyarrow as pa

    if name is None:
        name = f"part-{hashlib.sha1(bad.to_json(orient='records').encode('utf-8')).hexdigest()[:20]}.parquet"
    schema = pa.schema([(c, pa.string()) for c in QUARANTINE_COLUMNS])
    write_table(pa.Table.from_pandas(bad, schema=schema, preserve_index=False), f"{quarantine_dir.rstrip('/')}/{name}")


def quarantine_batch(batch, quarantine_dir: str, max_chars: int, name: str | None = None):
    """Ray Data map_batches step: returns the good rows, writes the bad ones (to `name`, or a name hashed from
    them).

    Arrow batches (the pipeline) stay Arrow: only the text and id columns are read row by row (the one rule,
    `malformed_reason`), a batch without bad rows passes through unchanged, and only bad rows ever become
    pandas. pandas batches (object columns of mixed types, in unit tests) go through `split_batch` whole.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(batch, pa.Table):
        good, bad = split_batch(batch, max_chars)
        if len(bad):
            _write_quarantine(bad, quarantine_dir, name)
        return good
    n = batch.num_rows
    ids = batch.column("id").to_pylist() if "id" in batch.column_names else [None] * n
    ok = [malformed_reason(t, i, max_chars) is None for t, i in zip(batch.column("text").to_pylist(), ids)]
    if not all(ok):
        mask = pa.array(ok, type=pa.bool_())
        _, bad = split_batch(batch.filter(pc.invert(mask)).to_pandas(), max_chars)
        _write_quarantine(bad, quarantine_dir, name)
        batch = batch.filter(mask)
    text_type = batch.schema.field("text").type
    if pa.types.is_binary(text_type) or pa.types.is_large_binary(text_type):  # good rows are valid UTF-8
        batch = batch.set_column(batch.schema.get_field_index("text"), "text", batch.column("text").cast(pa.string()))
    return batch


def read_valid(source: "WebSourceConfig", quarantine_dir: str, max_chars: int) -> "ray.data.Dataset":
    """The source's well-formed rows as a streaming Ray Dataset; malformed rows go to quarantine_dir."""
    from definemed.data.loaders import read_web_ray

    ds = read_web_ray(source)
    ds = ds.map_batches(quarantine_batch, batch_format="pyarrow",
                        fn_kwargs={"quarantine_dir": str(quarantine_dir), "max_chars": max_chars})
    return ds


def reset_quarantine(quarantine_dir: str) -> None:
    """Start a fresh pass: stale parts from an earlier, differently configured pass must not be counted."""
    import shutil

    p = Path(quarantine_dir)
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)


def quarantine_counts(quarantine_dir: str) -> dict[str, int]:
    """Rows per reason (and 'total') in a quarantine directory."""
    import pyarrow.parquet as pq

    counts = {r: 0 for r in REASONS}
    p = Path(quarantine_dir)
    for f in sorted(p.glob("part-*.parquet")) if p.exists() else []:
        for r in pq.read_table(f, columns=["reason"]).column("reason").to_pylist():
            counts[r] = counts.get(r, 0) + 1
    counts["total"] = sum(v for k, v in counts.items())
    return counts
