"""The streaming filter reproduces the filter's output from before it streamed (tests/data/filter_reference.json,
captured on the bundled sample plus planted rows), with fuzzy dedup and the German PII kinds added on top."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from tests.filter_reference import build_source, filter_cfg, summarise

pytestmark = pytest.mark.integration
REFERENCE = json.loads((Path(__file__).parent / "data" / "filter_reference.json").read_text(encoding="utf-8"))
WORD_KEYS = ("scored_words", "kept_words", "final_words")


def _sha(t: str) -> str:
    return hashlib.sha256(t.encode("utf-8")).hexdigest()[:16]


def test_streaming_filter_equals_the_reference_output_on_the_sample(ray_local, tmp_path, tiny_xlmr):
    from definemed.corpus.pii import redact
    from definemed.stages import STAGES, run_stage
    from definemed.text import word_count

    src = build_source(tmp_path / "src")
    cfg = filter_cfg(src, tmp_path / "out", tiny_xlmr)  # fuzzy dedup and all PII kinds on (the defaults)
    run_stage(STAGES["filter"], cfg)
    got, ref = summarise(Path(cfg.output_dir)), REFERENCE["pii=True"]
    steps = json.loads((Path(cfg.output_dir) / "stats.json").read_text())["steps"]

    # The sample holds no near-duplicates: the documents, scores and funnel are the reference's.
    assert steps["fuzzy_dedup"]["enabled"] and steps["fuzzy_dedup"]["permutations"] == 112
    assert steps["near_duplicates_removed"] == 0
    assert [d[0] for d in got["docs"]] == [d[0] for d in ref["docs"]]
    assert max(abs(a[2] - b[2]) for a, b in zip(got["docs"], ref["docs"])) < 1e-5
    assert {k: v for k, v in got["steps"].items() if k not in WORD_KEYS} == \
        {k: v for k, v in ref["steps"].items() if k not in WORD_KEYS}
    assert got["quarantine"] == ref["quarantine"] and got["decontaminated"] == ref["decontaminated"]
    assert got["columns"] == ["text", "score", "id"]
    assert {k: steps["pii_redacted"][k] for k in ("email", "phone", "ip")} == ref["pii_redacted"]

    # Texts: redact() of the source text; where the new PII kinds find nothing, byte-identical to the reference.
    source = pd.concat(pd.read_parquet(p) for p in sorted(src.glob("*.parquet"))).drop_duplicates("id")
    source = dict(zip(source["id"], source["text"]))
    fin = pd.read_parquet(Path(cfg.output_dir) / "finemed_de").set_index("id")["text"]
    new_kinds = 0
    for doc_id, sha, _ in ref["docs"]:
        red, counts = redact(source[doc_id])
        assert fin[doc_id] == red
        if any(counts[k] for k in counts if k not in ("email", "phone", "ip")):
            new_kinds += 1
        else:
            assert _sha(fin[doc_id]) == sha, doc_id
    assert new_kinds >= 1  # the sample's non-medical pages name people ("Herr Klein")
    # Word counts changed definition (definemed.text.words) after the reference was captured: recount.
    assert steps["final_words"] == sum(word_count(t) for t in fin)
    stats = json.loads((Path(cfg.output_dir) / "stats.json").read_text())
    assert "tiny randomly initialised" in stats["note"] and "not FineWeb2-de's 427.7M" in stats["note"]
