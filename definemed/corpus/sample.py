"""Seeded random sample of N documents, independent of file order and block layout.

Each document gets a key = hash(seed, id) in [0, 1). The sample is the N smallest keys: the same documents
whatever the partitioning, and growing N only adds documents. A cheap pre-filter (key < p, with p a bit above
N / total) keeps the global sort small; it is widened if it ever keeps too few.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import pandas as pd
    import ray.data


def sample_key(seed: int, doc_id: str) -> float:
    h = hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def add_sample_key(df: "pd.DataFrame", seed: int) -> "pd.DataFrame":
    df = df.copy()
    df["sample_key"] = [sample_key(seed, str(i)) for i in df["id"]]
    return df


def _below(df: "pd.DataFrame", p: float) -> "pd.DataFrame":
    return df[df["sample_key"] < p]


def take_sample(ds: "ray.data.Dataset", n: int, seed: int, total_hint: int | None,
                oversample: float = 1.3) -> "ray.data.Dataset":
    """The n documents with the smallest keys, sorted by key (fewer if the source has fewer)."""
    keyed = ds.map_batches(add_sample_key, batch_format="pandas", fn_kwargs={"seed": seed})
    p = 1.0 if not total_hint else min(1.0, oversample * n / total_hint + 1e-3)
    while True:
        sub = keyed.map_batches(_below, batch_format="pandas", fn_kwargs={"p": p}) if p < 1.0 else keyed
        sub = sub.materialize()
        if sub.count() >= n or p >= 1.0:
            return sub.sort("sample_key").limit(n)
        p = min(1.0, p * 2)


def iter_shards(sorted_sample: "ray.data.Dataset", shard_size: int) -> Iterator[tuple[int, "pd.DataFrame"]]:
    """(shard index, rows) in key order; shard i holds ranks [i*shard_size, (i+1)*shard_size)."""
    import pandas as pd

    buf: list[pd.DataFrame] = []
    have = 0
    shard = 0
    for batch in sorted_sample.iter_batches(batch_format="pandas", batch_size=shard_size):
        buf.append(batch)
        have += len(batch)
        while have >= shard_size:
            df = pd.concat(buf, ignore_index=True)
            yield shard, df.iloc[:shard_size].reset_index(drop=True)
            rest = df.iloc[shard_size:]
            buf, have, shard = ([rest] if len(rest) else []), len(rest), shard + 1
    if have:
        yield shard, pd.concat(buf, ignore_index=True).reset_index(drop=True)
