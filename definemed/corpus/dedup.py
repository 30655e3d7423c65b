"""Exact deduplication by content hash (NFC, whitespace runs collapsed). Keeps the smallest id per hash, so
the result does not depend on partitioning or arrival order."""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

_WS = re.compile(r"\s+")


def content_hash(text: str) -> str:
    norm = _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def add_hash(df: "pd.DataFrame") -> "pd.DataFrame":
    df = df.copy()
    df["content_hash"] = [content_hash(t) for t in df["text"]]
    return df


def keep_first(group: "pd.DataFrame") -> "pd.DataFrame":
    return group.sort_values("id", kind="stable").head(1)


def dedup(ds: "ray.data.Dataset") -> "ray.data.Dataset":
    """ds must have content_hash and id columns."""
    return ds.groupby("content_hash").map_groups(keep_first, batch_format="pandas")
