"""Fuzzy dedup (MinHash LSH): recall and precision on planted near-duplicates of known Jaccard similarity."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest


def _planted(n: int = 600, seed: int = 11):
    from definemed.corpus import dedup, synthetic

    cols, truth = synthetic.synth_shard(0, n, seed, medical_fraction=0.02, exact_dup_rate=0.0, near_dup_rate=0.12,
                                        pii_rate=0.0, jaccards=(0.8, 0.85, 0.9, 0.95))
    table = pa.table({"id": cols["id"], "text": cols["text"]})
    table = dedup.add_hash(table)
    return table, [t for t in truth if t["kind"] == "near_dup"]


def _score(table, truth, removed):
    key = dict(zip(table.column("id").to_pylist(), table.column("content_hash").to_pylist()))
    pairs = [t for t in truth if t["jaccard"] >= 0.8]
    recall = np.mean([key[t["id"]] in removed for t in pairs])
    planted = {key[t["id"]] for t in truth}
    precision = len(removed & planted) / max(1, len(removed))
    return recall, precision, len(pairs)


def test_minhash_lsh_recall_and_precision_on_planted_near_duplicates():
    from definemed.corpus.fuzzy import MinHashParams, find_duplicates_local

    table, truth = _planted()
    removed, stats = find_duplicates_local(table)
    recall, precision, n = _score(table, truth, removed)
    assert n >= 40
    assert recall >= 0.95 and precision >= 0.99, (recall, precision, stats)
    assert stats["removed"] == len(removed) and stats["clusters"] >= 1
    p = MinHashParams()
    assert p.num_perm == 112 and abs(p.threshold() - 0.719) < 0.01


def test_cluster_keeps_the_smallest_id_whatever_the_order():
    from definemed.corpus.fuzzy import find_duplicates_local

    table, _ = _planted(200, seed=5)
    removed, _ = find_duplicates_local(table)
    shuffled = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    assert find_duplicates_local(shuffled)[0] == removed
    key = dict(zip(table.column("content_hash").to_pylist(), table.column("id").to_pylist()))
    kept_ids = set(table.column("id").to_pylist()) - {key[h] for h in removed}
    assert kept_ids  # the source of every planted variant has a smaller id and is the one kept


@pytest.mark.integration
def test_ray_shuffle_finds_the_same_duplicates_as_one_process(ray_local):
    import ray.data

    from definemed.corpus.fuzzy import MinHashParams, find_duplicates, find_duplicates_local

    table, _ = _planted(300, seed=2)
    local, _ = find_duplicates_local(table)
    distributed, stats = find_duplicates(ray.data.from_arrow(table).repartition(4), MinHashParams(), partitions=3,
                                         batch_size=64)
    assert distributed == local and stats["removed"] == len(local) > 0
