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

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

    from definemed.data.loaders import WebSourceConfig

REASONS = ("null_text", "non_string", "empty", "whitespace", "oversized", "null_id")
QUARANTINE_COLUMNS = ("id", "reason", "text", "text_type", "row_json")


def _is_missing(value: Any) -> bool:
    """None, NaN, pd.NA or NaT: how a Parquet null reaches a pandas batch depends on the column dtype."""
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays and other non-scalars
        return False


def as_text(value: Any) -> tuple[str | None, str | None]:
    """(text, reason). Binary columns holding UTF-8 are text; anything else that is not a str is malformed."""
    if value is None or (not isinstance(value, (str, bytes, bytearray)) and _is_missing(value)):
        return None, "null_text"
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_string"
    if not isinstance(value, str):
        return None, "non_string"
    return value, None


def malformed_reason(text: Any, doc_id: Any, max_chars: int) -> str | None:
    """Why a row cannot be used, or None if it is fine. Checked in a fixed order so counts are stable."""
    text, reason = as_text(text)
    if reason:
        return reason
    if text == "":
        return "empty"
    if not text.strip():  # str.strip() also removes NBSP and ideographic spaces
        return "whitespace"
    if len(text) > max_chars:
        return "oversized"
    if doc_id is None or _is_missing(doc_id) or str(doc_id) == "":
        return "null_id"
    return None


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


def quarantine_batch(df: "pd.DataFrame", quarantine_dir: str, max_chars: int) -> "pd.DataFrame":
    """Ray Data map_batches step: returns the good rows, writes the bad ones."""
    import pyarrow as pa

    good, bad = split_batch(df, max_chars)
    if len(bad):
        h = hashlib.sha1(bad.to_json(orient="records").encode("utf-8")).hexdigest()[:20]
        schema = pa.schema([(c, pa.string()) for c in QUARANTINE_COLUMNS])
        write_table(pa.Table.from_pandas(bad, schema=schema, preserve_index=False),
                    f"{quarantine_dir.rstrip('/')}/part-{h}.parquet")
    return good


def read_valid(source: "WebSourceConfig", quarantine_dir: str, max_chars: int) -> "ray.data.Dataset":
    """The source's well-formed rows as a streaming Ray Dataset; malformed rows go to quarantine_dir."""
    from definemed.data.loaders import read_web_ray

    ds = read_web_ray(source)
    ds = ds.map_batches(quarantine_batch, batch_format="pandas",
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
