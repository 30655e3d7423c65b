"""The streaming filter reproduces the filter's output from before it streamed (tests/data/filter_reference.json,
captured on the bundled sample plus planted rows), then adds fuzzy dedup and the German PII kinds on top."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.filter_reference import build_source, filter_cfg, summarise

pytestmark = pytest.mark.integration
REFERENCE = json.loads((Path(__file__).parent / "data" / "filter_reference.json").read_text(encoding="utf-8"))
WORD_KEYS = ("scored_words", "kept_words", "final_words")


def test_streaming_filter_equals_the_reference_output_on_the_sample(ray_local, tmp_path, tiny_xlmr):
    from definemed.stages import STAGES, run_stage
    from definemed.text import word_count

    src = build_source(tmp_path / "src")
    cfg = filter_cfg(src, tmp_path / "out", tiny_xlmr, pii=False, fuzzy_dedup={"enabled": False})
    run_stage(STAGES["filter"], cfg)
    got, ref = summarise(Path(cfg.output_dir)), REFERENCE["pii=False"]
    assert [d[:2] for d in got["docs"]] == [d[:2] for d in ref["docs"]]  # ids and text hashes, in id order
    assert max(abs(a[2] - b[2]) for a, b in zip(got["docs"], ref["docs"])) < 1e-5
    assert {k: v for k, v in got["steps"].items() if k not in WORD_KEYS} == \
        {k: v for k, v in ref["steps"].items() if k not in WORD_KEYS}
    assert got["quarantine"] == ref["quarantine"] and got["decontaminated"] == ref["decontaminated"]
    assert got["columns"] == ref["columns"] == ["text", "score", "id"]
    # Word counts changed definition (definemed.text.words) after the reference was captured: recount.
    fin = pd.read_parquet(Path(cfg.output_dir) / "finemed_de")
    assert got["steps"]["final_words"] == sum(word_count(t) for t in fin["text"])
    stats = json.loads((Path(cfg.output_dir) / "stats.json").read_text())
    assert "tiny randomly initialised" in stats["note"] and "not FineWeb2-de's 427.7M" in stats["note"]

    # The same scores (the clean pass reads them, nothing is rescored), now with fuzzy dedup and every PII kind.
    from definemed.corpus.filter import clean_pass

    steps = clean_pass(filter_cfg(src, tmp_path / "out2", tiny_xlmr), Path(cfg.output_dir) / "scored",
                       tmp_path / "out2")
    old_kinds = {k: steps["pii_redacted"][k] for k in ("email", "phone", "ip")}
    assert old_kinds == REFERENCE["pii=True"]["pii_redacted"]
    assert steps["fuzzy_dedup"]["enabled"] and steps["fuzzy_dedup"]["permutations"] == 112
    assert steps["final_docs"] == ref["steps"]["final_docs"] - steps["near_duplicates_removed"]
    assert steps["pii_redacted"]["name"] >= 1  # the sample's non-medical pages name people ("Herr Klein")
