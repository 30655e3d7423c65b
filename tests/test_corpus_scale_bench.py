"""The scale benchmark's pieces: the synthetic corpus keeps its promises, and the Ray store adapter still works."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_synthetic_shard_plants_what_it_records():
    from definemed.corpus import synthetic
    from definemed.text import word_count

    cols, truth = synthetic.synth_shard(0, 400, seed=1, exact_dup_rate=0.05, near_dup_rate=0.05, pii_rate=0.05)
    assert list(cols) == list(synthetic.FINEWEB2_COLUMNS) and len(cols["text"]) == 400
    text = dict(zip(cols["id"], cols["text"]))
    kinds = {k: [t for t in truth if t["kind"] == k] for k in ("exact_dup", "near_dup", "pii")}
    assert all(len(v) >= 8 for v in kinds.values())
    for t in kinds["near_dup"]:  # the recorded Jaccard is the measured one
        assert t["jaccard"] == pytest.approx(synthetic.jaccard(text[t["id"]], text[t["of"]]))
        assert 0.7 < t["jaccard"] < 1.0
    mean_words = sum(word_count(t) for t in cols["text"]) / 400
    assert 300 < mean_words < 900  # log-normal around FineWeb2-de's ~550 words


def test_same_seed_gives_the_same_corpus_in_every_process():
    # PYTHONHASHSEED changes set order between processes; a benchmark or test corpus must not depend on it
    import os
    import subprocess

    code = ("import hashlib; from definemed.corpus import synthetic; "
            "c, _ = synthetic.synth_shard(0, 300, seed=11, near_dup_rate=0.2); "
            "print(hashlib.sha256('\\x00'.join(c['text']).encode()).hexdigest())")
    root = str(Path(__file__).resolve().parents[1])
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                              env={**os.environ, "PYTHONHASHSEED": hs, "PYTHONPATH": root}).stdout.strip()
               for hs in ("1", "2", "3")}
    assert len(digests) == 1, digests


@pytest.mark.integration
def test_ray_store_adapter_reads_object_store_use(ray_local):
    import numpy as np
    import ray

    sys.path.insert(0, str(BENCH))
    from _ray_store import store_stats

    ref = ray.put(np.zeros(8 * 2**20, dtype=np.uint8))  # 8 MiB in plasma
    stats = store_stats(ray.get_runtime_context().gcs_address)
    assert stats["used"] >= 8 * 2**20 and stats["spilled"] >= 0
    del ref
