"""The streaming filter reproduces the filter's output from before it streamed (tests/data/filter_reference.json,
captured on the bundled sample plus planted rows), with fuzzy dedup and the German PII kinds added on top; a
filter whose driver is killed half-way through scoring resumes to the same output."""
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


PART_ROWS = 16  # ~22 parts of the scoring pass, so a kill can land half-way


@pytest.fixture(scope="module")
def filtered(ray_local, tmp_path_factory, tiny_xlmr):
    """One uninterrupted filter run: (source dir, config)."""
    from definemed.stages import STAGES, run_stage

    root = tmp_path_factory.mktemp("filter")
    src = build_source(root / "src")
    cfg = filter_cfg(src, root / "out", tiny_xlmr, block_rows=PART_ROWS)  # fuzzy dedup and all PII kinds on
    run_stage(STAGES["filter"], cfg)
    return src, cfg


def test_streaming_filter_equals_the_reference_output_on_the_sample(filtered):
    from definemed.corpus.pii import redact
    from definemed.text import word_count

    src, cfg = filtered
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


def _frames(d: Path) -> pd.DataFrame:
    """A Parquet directory's rows in file-name order, as a reader of the dataset sees them."""
    return pd.concat([pd.read_parquet(f) for f in sorted(d.glob("*.parquet"))], ignore_index=True)


def test_filter_killed_half_way_through_scoring_resumes_to_identical_output(filtered, tmp_path, tiny_xlmr):
    from definemed.corpus.filter import PARTS_DIR
    from definemed.data.loaders import plan_web_parts
    from definemed.stages import STAGES, run_stage
    from tests.killer import kill_when

    src, full_cfg = filtered
    cfg = filter_cfg(src, tmp_path / "out", tiny_xlmr, block_rows=PART_ROWS)
    out = Path(cfg.output_dir)
    parts = len(plan_web_parts(cfg.source, PART_ROWS)["parts"])
    assert parts >= 10
    markers = out / "scored" / PARTS_DIR
    code = ("from definemed.stages import STAGES, run_stage\n"
            "from tests.filter_reference import filter_cfg\n"
            f"run_stage(STAGES['filter'], filter_cfg({str(src)!r}, {str(out)!r}, {tiny_xlmr!r}, "
            f"block_rows={PART_ROWS}))\n")
    kill_when(code, lambda: len(list(markers.glob("*.json"))) >= parts // 2)

    assert not (out / "scored" / "_SCORED.json").exists() and not (out / "_DONE.json").exists()
    assert (out / "_RUN.json").exists()
    left = [p for p in (out / "scored").iterdir() if p.name.startswith(".")]  # a part killed mid-write, if any
    (out / ".finemed_de.tmp-deadbeef").mkdir()  # what a run killed in a later pass leaves
    run_stage(STAGES["filter"], cfg)

    full, resumed = Path(full_cfg.output_dir), out
    scoring = json.loads((resumed / "stats.json").read_text())["steps"]["scoring"]
    total = json.loads((full / "stats.json").read_text())["steps"]["scored_docs"]
    assert scoring["parts"] == parts and 0 < scoring["parts_reused"] < parts
    assert 0 < scoring["docs_scored_now"] <= 0.6 * total, scoring
    for d in ("scored", "finemed_de", "quarantine"):  # same rows, same order
        pd.testing.assert_frame_equal(_frames(resumed / d), _frames(full / d))
    pd.testing.assert_frame_equal(pd.read_parquet(resumed / "decontaminated.parquet"),
                                  pd.read_parquet(full / "decontaminated.parquet"))
    steps = {k: v for k, v in json.loads((resumed / "stats.json").read_text())["steps"].items() if k != "scoring"}
    assert steps == {k: v for k, v in json.loads((full / "stats.json").read_text())["steps"].items()
                     if k != "scoring"}
    orphans = [p for p in [*resumed.iterdir(), *(resumed / "scored").iterdir()] if ".tmp" in p.name]
    assert orphans == [] and all(not p.exists() for p in left)
