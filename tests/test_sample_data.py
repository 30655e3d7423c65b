"""The bundled sample: schemas, balance, uniqueness, MC validity, and that the built files match the sources."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from definemed.data.sample import (MMLU_SUBJECTS, PROMPT_CATEGORIES, SAMPLE_MALFORMED, SAMPLE_MEDQA, SAMPLE_MMLU,
                                   SAMPLE_PROMPTS, SAMPLE_WEB_DIR, SAMPLE_WEB_SRC)
from definemed.data.sample import build
from definemed.data.schemas import FINEWEB2_COLUMNS, MALFORMED_KINDS, SAMPLE_WEB_COLUMNS

HARD_NEGATIVES = {"wellness_marketing", "veterinary", "sports_nutrition", "school_biology", "health_insurance",
                  "cosmetics"}
MEDICAL_TOPICS = {"patient_information", "guideline", "pharmacology", "anatomy", "nursing", "health_news"}


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]


@pytest.fixture(scope="module")
def web() -> pa.Table:
    files = sorted(SAMPLE_WEB_DIR.glob("*.parquet"))
    assert files, f"no shards in {SAMPLE_WEB_DIR}: run scripts/build_sample_data.py"
    return pa.concat_tables(pq.read_table(f) for f in files)


# ---------------------------------------------------------------------------------------------- web documents

def test_shard_schema_is_fineweb2_plus_gold(web):
    assert web.column_names == list(SAMPLE_WEB_COLUMNS)
    assert web.column_names[: len(FINEWEB2_COLUMNS)] == list(FINEWEB2_COLUMNS)
    types = dict(zip(web.column_names, web.schema.types))
    assert types["language_score"] == pa.float64() and types["minhash_cluster_size"] == pa.int64()
    assert all(types[c] == pa.string() for c in SAMPLE_WEB_COLUMNS
               if c not in ("language_score", "minhash_cluster_size"))
    for c in web.column_names:
        assert web[c].null_count == 0, c
    rows = web.to_pylist()
    assert {r["language"] for r in rows} == {"deu"} and {r["language_script"] for r in rows} == {"Latn"}
    for r in rows:
        assert re.fullmatch(r"<urn:uuid:[0-9a-f-]{36}>", r["id"])
        assert re.fullmatch(r"CC-MAIN-\d{4}-\d{2}", r["dump"])
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", r["date"])
        assert r["file_path"].startswith(f"s3://commoncrawl/crawl-data/{r['dump']}/") and r["file_path"].endswith(
            ".warc.gz")
        assert r["url"].startswith("https://")
        assert 0.0 < r["language_score"] <= 1.0 and r["minhash_cluster_size"] >= 1
        assert r["gold_label"] in ("medical", "non_medical") and r["gold_rationale"].strip()
    assert len({r["id"] for r in rows}) == len(rows)


def test_class_balance_size_and_lengths(web):
    labels = Counter(web["gold_label"].to_pylist())
    n = sum(labels.values())
    assert n >= 300
    assert 0.35 <= labels["medical"] / n <= 0.45, labels
    words = [len(t.split()) for t in web["text"].to_pylist()]
    too_short = [w for w in words if w < 50]
    too_long = [w for w in words if w > 600]
    assert not too_short and not too_long, (too_short, too_long)


def test_topics_include_hard_negatives_and_medical_kinds(web):
    by_label: dict[str, set] = {}
    for topic, label in zip(web["topic"].to_pylist(), web["gold_label"].to_pylist()):
        by_label.setdefault(label, set()).add(topic)
    assert HARD_NEGATIVES <= by_label["non_medical"], HARD_NEGATIVES - by_label["non_medical"]
    assert MEDICAL_TOPICS <= by_label["medical"], MEDICAL_TOPICS - by_label["medical"]
    assert not by_label["medical"] & by_label["non_medical"], "a topic must not carry both labels"
    # hard negatives are a real share, not a token few
    counts = Counter(web["topic"].to_pylist())
    assert all(counts[t] >= 5 for t in HARD_NEGATIVES), counts


def test_no_duplicate_texts_exact_or_normalised(web):
    texts = web["text"].to_pylist()
    assert len(set(texts)) == len(texts)
    norm = [build.norm_text(t) for t in texts]
    dups = [t[:60] for t, c in Counter(norm).items() if c > 1]
    assert not dups, dups
    urls = web["url"].to_pylist()
    assert len(set(urls)) == len(urls)


def test_no_contact_data_in_texts(web):
    text = "\n".join(web["text"].to_pylist())
    assert not re.search(r"[\w.+-]+@[\w-]+\.[a-z]{2,}", text), "e-mail address in sample"
    assert not re.search(r"(\+49|\b0\d{2,4})[\s/-]?\d{3,}[\s-]?\d{2,}", text), "phone number in sample"


def test_shards_equal_jsonl_sources(web):
    """The Parquet is a pure function of src/*.jsonl: editing one without rebuilding fails here."""
    expected = build.web_shards()
    files = sorted(SAMPLE_WEB_DIR.glob("*.parquet"))
    assert [f.name for f in files] == [build.shard_name(i, len(expected)) for i in range(len(expected))]
    for f, t in zip(files, expected):
        assert pq.read_table(f).equals(t), f"{f.name} is stale: run scripts/build_sample_data.py"
    src = [r for p in SAMPLE_WEB_SRC for r in _jsonl(p)]
    got = {(r["text"], r["url"], r["topic"], r["gold_label"], r["gold_rationale"]) for r in web.to_pylist()}
    assert got == {(r["text"], r["url"], r["topic"], r["label"], r["rationale"]) for r in src}
    assert web["id"].to_pylist() == [build.doc_id(t) for t in web["text"].to_pylist()]


def test_build_is_deterministic_and_shuffled():
    a, b = build.web_records(), build.web_records()
    assert a == b
    labels = [r["gold_label"] for r in a]
    # shuffled: the medical rows are not one block at the start as in the sources
    first_half = labels[: len(labels) // 2]
    assert 0.2 < first_half.count("medical") / len(first_half) < 0.6


def test_data_card_counts_are_current():
    card = build.DATA_CARD.read_text(encoding="utf-8")
    assert build.render_card(card) == card, "DATA_CARD.md counts are stale: run scripts/build_sample_data.py"


# ---------------------------------------------------------------------------------------------- malformed rows

def test_malformed_file_has_each_kind():
    t = pq.read_table(SAMPLE_MALFORMED)
    assert t.column_names == list(SAMPLE_WEB_COLUMNS) + ["malformed_kind"]
    assert t.schema.field("text").type == pa.binary()
    assert t.equals(build.malformed_table()), "malformed.parquet is stale: run scripts/build_sample_data.py"
    rows = {r["malformed_kind"]: r["text"] for r in t.to_pylist()}
    assert set(rows) == set(MALFORMED_KINDS)
    assert rows["empty"] == b""
    assert rows["whitespace"] and rows["whitespace"].decode("utf-8").strip() == ""
    assert rows["null"] is None
    with pytest.raises(UnicodeDecodeError):
        rows["wrong_type"].decode("utf-8")
    assert len(rows["oversized"].decode("utf-8")) > build.OVERSIZED_CHARS
    ok = rows["ok"].decode("utf-8")
    assert 50 <= len(ok.split()) <= 600


# ---------------------------------------------------------------------------------------------- MC items

def test_mmlu_items_valid_and_balanced():
    items = _jsonl(SAMPLE_MMLU)
    assert len(items) >= 120
    subjects = Counter(r["subject"] for r in items)
    assert set(subjects) == set(MMLU_SUBJECTS), subjects
    assert min(subjects.values()) >= 15
    for i, r in enumerate(items):
        assert set(r) == {"question", "choices", "answer", "subject"}, i
        assert r["question"].strip(), i
        ch = r["choices"]
        assert isinstance(ch, list) and len(ch) == 4 and all(isinstance(c, str) and c.strip() for c in ch), i
        assert len({c.strip().casefold() for c in ch}) == 4, f"item {i}: options not distinct"
        assert isinstance(r["answer"], int) and not isinstance(r["answer"], bool) and 0 <= r["answer"] < 4, i
    assert len({r["question"] for r in items}) == len(items)
    # answer positions spread out, so always guessing one letter cannot score well
    keys = Counter(r["answer"] for r in items)
    assert max(keys.values()) / len(items) < 0.4, keys


def test_medqa_items_valid():
    items = _jsonl(SAMPLE_MEDQA)
    assert len(items) >= 60
    for i, r in enumerate(items):
        assert {"question", "options", "answer_idx"} <= set(r), i
        assert r["question"].strip()
        opts = r["options"]
        assert sorted(opts) == list("ABCDE"), i
        assert all(isinstance(v, str) and v.strip() for v in opts.values()), i
        assert len({v.strip().casefold() for v in opts.values()}) == 5, f"item {i}: options not distinct"
        assert isinstance(r["answer_idx"], str) and r["answer_idx"] in opts, i
    assert len({r["question"] for r in items}) == len(items)
    keys = Counter(r["answer_idx"] for r in items)
    assert max(keys.values()) / len(items) < 0.4, keys


# ---------------------------------------------------------------------------------------------- prompts

def test_prompts_cover_all_categories():
    rows = _jsonl(SAMPLE_PROMPTS)
    assert len(rows) >= 60
    assert all(set(r) == {"id", "category", "prompt"} for r in rows)
    cats = Counter(r["category"] for r in rows)
    assert set(cats) == set(PROMPT_CATEGORIES) and min(cats.values()) >= 12, cats
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({build.norm_text(r["prompt"]) for r in rows}) == len(rows)
    text = "\n".join(r["prompt"] for r in rows)
    assert not re.search(r"[\w.+-]+@[\w-]+\.[a-z]{2,}", text)
    # the summarising and rewording prompts carry the document to work on
    for r in rows:
        if r["category"] in ("discharge_summary", "patient_friendly_rewording"):
            task, _, doc = r["prompt"].partition("\n\n")
            assert len(doc.split()) >= 20, r["id"]


def test_tokenizer_texts_include_all_sources():
    from definemed.data.sample import iter_tokenizer_texts

    texts = set(iter_tokenizer_texts())
    assert _jsonl(SAMPLE_PROMPTS)[0]["prompt"] in texts
    assert _jsonl(SAMPLE_MEDQA)[0]["question"] in texts
    assert _jsonl(SAMPLE_WEB_SRC[0])[0]["text"] in texts
