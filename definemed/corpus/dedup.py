"""Exact deduplication by content hash (NFC, whitespace runs collapsed). Keeps the smallest id per hash, so
the result does not depend on partitioning or arrival order.

On Ray Data it is a hash-partitioned shuffle (`repartition(keys=["content_hash"])`: every hash lands in exactly
one block) followed by one vectorised call per block: sort by (hash, id), keep each hash's first row. No Python
call per group, unlike `groupby().map_groups()`.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

_WS = re.compile(r"\s+")


def content_hash(text: str) -> str:
    norm = _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def add_hash(batch: "pa.Table") -> "pa.Table":
    import pyarrow as pa

    hashes = [content_hash(t) for t in batch.column("text").to_pylist()]
    return batch.append_column("content_hash", pa.array(hashes, type=pa.string()))


def keep_first(block: "pa.Table") -> "pa.Table":
    """The smallest id of each content hash in the block (the block holds every row of its hashes)."""
    import numpy as np
    import pyarrow as pa

    if block.num_rows < 2:
        return block
    t = block.sort_by([("content_hash", "ascending"), ("id", "ascending")])
    h = t.column("content_hash").to_numpy(zero_copy_only=False)
    first = np.r_[True, h[1:] != h[:-1]]
    return t.filter(pa.array(first))


def dedup(ds: "ray.data.Dataset", partitions: int) -> "ray.data.Dataset":
    """ds must have content_hash and id columns."""
    return ds.repartition(partitions, keys=["content_hash"]).map_batches(keep_first, batch_format="pyarrow",
                                                                        batch_size=None)
