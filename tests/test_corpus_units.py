"""Unit tests of the corpus steps (no Ray, no engine): each step is testable alone."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from definemed.config import ConfigError, parse_config


# ------------------------------------------------------------------------------------------------ ingest


def test_quarantine_reasons_cover_every_malformed_kind():
    from definemed.corpus.ingest import split_batch

    df = pd.DataFrame({"id": ["a", "b", "c", "d", "e", "f", "g", None],
                       "text": [b"", " \n\t\u00a0\u3000", None, b"\x89PNG\r\n\xff\xfe", "x" * 51, "gut", 17, "ok"]})
    good, bad = split_batch(df, max_chars=50)
    assert good["id"].tolist() == ["f"] and good["text"].tolist() == ["gut"]
    assert dict(zip(bad["id"].fillna("<none>"), bad["reason"])) == {
        "a": "empty", "b": "whitespace", "c": "null_text", "d": "non_string", "e": "oversized", "g": "non_string",
        "<none>": "null_id"}
    assert len(good) + len(bad) == len(df)  # nothing dropped silently
    assert bad.loc[bad["id"] == "e", "text"].item() == "x" * 51  # the original is kept, not truncated


def test_bundled_malformed_file_is_quarantined_except_the_control_row(tmp_path):
    import pyarrow.parquet as pq

    from definemed.corpus.ingest import quarantine_batch, quarantine_counts
    from definemed.data.sample import SAMPLE_MALFORMED

    df = pq.read_table(SAMPLE_MALFORMED).to_pandas()
    good = quarantine_batch(df, str(tmp_path), max_chars=200_000)
    assert good["malformed_kind"].tolist() == ["ok"] and isinstance(good["text"].iloc[0], str)
    counts = quarantine_counts(str(tmp_path))
    assert counts["total"] == len(df) - 1
    q = pd.concat([pd.read_parquet(p) for p in tmp_path.glob("part-*.parquet")])
    expected = {"empty": "empty", "whitespace": "whitespace", "null": "null_text", "wrong_type": "non_string",
                "oversized": "oversized"}
    kinds = dict(zip(df["id"], df["malformed_kind"]))
    assert {kinds[i]: r for i, r in zip(q["id"], q["reason"])} == expected
    quarantine_batch(df, str(tmp_path), max_chars=200_000)  # a retried task rewrites the same file
    assert quarantine_counts(str(tmp_path))["total"] == len(df) - 1


def test_arrow_batches_are_quarantined_by_the_same_rule(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from definemed.corpus.ingest import quarantine_batch, quarantine_counts
    from definemed.data.sample import SAMPLE_MALFORMED

    table = pq.read_table(SAMPLE_MALFORMED)  # text is a binary column here
    good = quarantine_batch(table, str(tmp_path / "a"), max_chars=200_000)
    assert isinstance(good, pa.Table) and good.schema.field("text").type == pa.string()
    assert good.column("malformed_kind").to_pylist() == ["ok"]
    pandas_side = tmp_path / "p"
    quarantine_batch(table.to_pandas(), str(pandas_side), max_chars=200_000)
    assert quarantine_counts(str(tmp_path / "a")) == quarantine_counts(str(pandas_side))
    clean = pa.table({"id": ["x", "y"], "text": ["gut", "auch gut"]})
    assert quarantine_batch(clean, str(tmp_path / "c"), max_chars=100) is clean  # passes through untouched


# ------------------------------------------------------------------------------------------------ annotate


def test_prompt_is_german_versioned_and_answers_parse_strictly():
    from definemed.corpus.annotate import CHOICES, UNPARSED, load_prompt, parse_answer, render_prompt

    template, sha = load_prompt("v1")
    assert "{text}" in template and "medizinisch" in template and "Rubrik" in template.replace("rubrik", "Rubrik")
    assert len(sha) == 12
    assert render_prompt(template, "Q" * 500, 100).count("Q") == 100
    assert set(CHOICES.values()) == {"medical", "non_medical"}
    assert parse_answer("medizinisch") == "medical"
    assert parse_answer(" Nicht medizinisch.\n") == "non_medical"
    for raw in ("medizin", "vielleicht medizinisch", "", None, "nicht"):
        assert parse_answer(raw) == UNPARSED  # never guessed


def test_unknown_prompt_version_is_a_config_error(tmp_path):
    from definemed.corpus.config import AnnotateConfig

    with pytest.raises(ConfigError, match="prompt_version"):
        parse_config(AnnotateConfig, {"output_dir": str(tmp_path), "source": {"path": str(tmp_path)},
                                      "prompt_version": "v99"})
    with pytest.raises(ConfigError, match="http"):
        parse_config(AnnotateConfig, {"output_dir": str(tmp_path), "source": {"path": str(tmp_path)},
                                      "backend": "http"})


def test_finalize_shard_keeps_input_order_and_counts_errors_as_unparsed():
    from definemed.corpus.annotate import finalize_shard

    inputs = pd.DataFrame({"id": ["x", "y", "z"], "shard": [4, 4, 4]})
    answers = pd.DataFrame({"id": ["z", "x", "y"], "shard": [4, 4, 4],
                            "raw_answer": ["nicht medizinisch", "medizinisch", None],
                            "error": [None, None, "prompt too long"]})
    out = finalize_shard(inputs, answers, "m", "v1", "abc")
    assert out["id"].tolist() == ["x", "y", "z"]
    assert out["label"].tolist() == ["medical", "unparsed", "non_medical"]
    with pytest.raises(RuntimeError):
        finalize_shard(inputs, answers.iloc[:2], "m", "v1", "abc")


def test_sample_key_is_deterministic_and_seeded():
    from definemed.corpus.sample import sample_key

    assert sample_key(0, "a") == sample_key(0, "a")
    assert sample_key(0, "a") != sample_key(1, "a")
    keys = [sample_key(0, str(i)) for i in range(2000)]
    assert 0 <= min(keys) and max(keys) < 1 and 0.45 < np.mean(keys) < 0.55


# ------------------------------------------------------------------------------------------------ metrics


def test_quality_report_matches_hand_computed_counts(tmp_path):
    from definemed.corpus.quality import quality_report, to_markdown, write_report

    labels = pd.DataFrame({"id": list("abcdef"),
                           "label": ["medical", "medical", "non_medical", "unparsed", "medical", "non_medical"]})
    gold = pd.DataFrame({"id": list("abcdef"),
                         "gold_label": ["medical", "non_medical", "medical", "medical", "medical", None]})
    rep = quality_report(labels, gold, "gold_label", n_boot=200)
    m = rep["metrics"]
    assert rep["n_compared"] == 5 and rep["n_without_gold"] == 1 and rep["unparsed"] == 1
    assert m["precision"]["value"] == pytest.approx(2 / 3) and m["recall"]["value"] == pytest.approx(2 / 4)
    assert m["f1"]["value"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["f1"]["ci_low"] <= m["f1"]["value"] <= m["f1"]["ci_high"] and m["f1"]["std"] > 0
    assert rep["confusion_matrix"]["counts"]["medical"] == {"medical": 2, "non_medical": 1, "unparsed": 1}
    j, md = write_report(rep, tmp_path)
    assert "91.1" in md.read_text() and "| f1 |" in to_markdown(rep)


def test_fbeta_weighs_precision_and_sweep_is_monotone_in_kept_fraction():
    from definemed.corpus.metrics import fbeta, pr_curve, threshold_sweep

    assert fbeta(8, 0, 4, 0.7) > fbeta(8, 4, 0, 0.7)  # same F1, precision preferred with beta < 1
    assert fbeta(0, 0, 5, 0.7) == 0.0
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    s = np.clip(y * 0.5 + rng.random(200) * 0.6, 0, 1)
    rows = threshold_sweep(s, y, [0.1, 0.5, 0.9], beta=0.7)
    assert [r["kept_fraction"] for r in rows] == sorted([r["kept_fraction"] for r in rows], reverse=True)
    p, r, t = pr_curve(s, y)
    assert np.all(np.diff(r) >= 0) and r[-1] == 1.0 and len(p) == len(t)


# ------------------------------------------------------------------------------------------------ filter steps


def test_pii_redaction_counts_and_spares_look_alikes():
    from definemed.corpus.pii import redact

    text = ("Kontakt: dr.mueller@klinik-beispiel.de, Tel. +49 30 1234567 oder (030) 123 456 78, mobil "
            "0171-1234567, Fax 089/12 34 56. Server 192.168.0.1 und 2001:db8::1.")
    red, c = redact(text)
    assert {k: v for k, v in c.items() if v} == {"email": 1, "phone": 4, "ip": 2}
    assert "@" not in red and "1234567" not in red and "192.168" not in red
    benign = "Am 01.02.2023 um 12:30 Uhr, 2,5 mg/kg, ICD I10.9, Klade 2.3.4.4b, Seite 12-15."
    assert redact(benign) == (benign, {k: 0 for k in c})


def test_decontam_matches_13_gram_overlap_only():
    from definemed.corpus.decontam import build_index, normalised_words as words

    item = ("Ein 54-jähriger Patient stellt sich mit akuten retrosternalen Schmerzen vor, die in den linken Arm "
            "ausstrahlen. Welche Diagnose ist am wahrscheinlichsten?")
    idx = build_index([("mmlu/1", item), ("short", "Was ist Fieber?")], n=13)
    assert idx.too_short == 1 and idx.items == 2 and idx.info()["items_by_rule"] == {"ngram": 1, "whole_item": 0}
    w = words(item)
    doc = "Blog. " + " ".join(w[2:15]).upper() + " Mehr dazu morgen."  # 13 words, case-insensitive
    assert idx.match(doc) == "mmlu/1"
    assert idx.match("Ein Patient mit Schmerzen im Arm. " + " ".join(w[2:14])) is None  # 12 < 13 words


def test_decontam_catches_items_shorter_than_13_words_whole():
    from definemed.corpus.decontam import build_index

    short = "Welches Enzym wird durch Phenprocoumon gehemmt?\nVitamin-K-Epoxid-Reduktase\nThrombin\nFaktor Xa"
    idx = build_index([("mmlu/52", short), ("tiny", "Was ist Fieber?")], n=13, min_item_words=8)
    assert idx.info()["items_by_rule"] == {"ngram": 0, "whole_item": 1} and idx.too_short == 1
    doc = ("Quiz zur Gerinnung: welches Enzym wird durch PHENPROCOUMON gehemmt? – Vitamin-K-Epoxid-Reduktase, "
           "Thrombin; Faktor Xa. Auflösung morgen.")  # case, punctuation and layout do not matter
    assert idx.match_rule(doc) == ("mmlu/52", "whole_item")
    partial = "Welches Enzym wird durch Phenprocoumon gehemmt? Das erklärt der Apotheker."
    assert idx.match_rule(partial) is None  # the whole item, not a part of it
    assert idx.match("Was ist Fieber? Fieber ist eine erhöhte Körpertemperatur.") is None  # too short to match


def test_words_are_one_definition_for_filter_decontam_and_failure_modes():
    from definemed.corpus import decontam
    from definemed.eval import failure_modes
    from definemed.text import word_count, words

    text = "Ein 54-jähriger Patient erhielt 2,5 mg/kg Magen-Darm-Mittel."
    assert words(text) == ["Ein", "54-jähriger", "Patient", "erhielt", "2", "5", "mg", "kg", "Magen-Darm-Mittel"]
    assert failure_modes.words is words and failure_modes.word_count is word_count and word_count(text) == 9
    assert decontam.normalised_words(text) == [w.lower() for w in words(text)]


def test_pack_sets_aside_exactly_the_rows_ingest_quarantines(tmp_path):
    """Pack and ingest must agree row by row on what is malformed, whatever the rule becomes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from definemed.corpus.ingest import quarantine_batch
    from definemed.train.pack import QUARANTINE_FILE, write_quarantine

    texts = ["Ein Befund.", None, "", " \n\t ", "x" * 300_000, "Noch ein Befund", "\u00a0\u2003", "ok"]
    table = pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})
    pq.write_table(table, tmp_path / "in.parquet")
    n = write_quarantine([str(tmp_path / "in.parquet")], None, "text", tmp_path)
    packed = pq.read_table(tmp_path / QUARANTINE_FILE).select(["id", "reason"]).to_pylist()
    quarantine_batch(table, str(tmp_path / "q"), max_chars=None)  # pack sets no size limit
    ingested = pq.read_table(next((tmp_path / "q").glob("*.parquet"))).select(["id", "reason"]).to_pylist()
    assert n == len(packed) >= 4 and packed == ingested


def test_content_hash_ignores_whitespace_layout_only():
    from definemed.corpus.dedup import content_hash

    assert content_hash("Herz  und\nKreislauf ") == content_hash("Herz und Kreislauf")
    assert content_hash("Herz und Kreislauf") != content_hash("herz und Kreislauf")


def test_filter_config_rejects_inverted_actor_pool(tmp_path):
    from definemed.corpus.config import FilterConfig

    with pytest.raises(ConfigError, match="max_actors"):
        parse_config(FilterConfig, {"output_dir": str(tmp_path), "source": {"path": str(tmp_path)},
                                    "classifier": str(tmp_path), "min_actors": 3, "max_actors": 2})


def test_classify_split_is_deterministic_and_shuffle_keeps_label_counts():
    from definemed.corpus.classify import shuffle_labels, split_of

    splits = [split_of(str(i), 0, 0.2, 0.2) for i in range(1000)]
    assert splits == [split_of(str(i), 0, 0.2, 0.2) for i in range(1000)]
    assert 150 < splits.count("test") < 250 and 150 < splits.count("val") < 250
    df = pd.DataFrame({"id": [str(i) for i in range(100)], "label": [i % 3 == 0 for i in range(100)],
                       "split": splits[:100]})
    sh = shuffle_labels(df, 0)
    for s in ("train", "val", "test"):
        assert sh[sh.split == s].label.sum() == df[df.split == s].label.sum()
    assert (sh.label != df.label).any()


def test_stats_table_reports_study_numbers():
    from definemed.corpus.filter import stats_table

    stats = {"scored_docs": 10, "scored_words": 1000, "kept_docs": 4, "kept_words": 400, "after_dedup_docs": 3,
             "duplicates_removed": 1, "contaminated_removed": 1, "final_docs": 2, "final_words": 180,
             "pii_redacted": {"email": 1, "phone": 0, "ip": 0}, "decontam": {"enabled": True}}
    table, md = stats_table(stats, {"empty": 2, "total": 2}, 0.9)
    assert table["source"] == {"docs": 12, "words": 1000} and table["filtered"] == {"docs": 2, "words": 180}
    assert "427.7M" in md and "7.3M" in md and "16.67%" in md
    _, md = stats_table(stats, {"total": 2}, 0.9, note="This run read 12 documents")
    assert "> **This run read 12 documents**" in md.splitlines()[2]


def test_invalid_corpus_config_exits_2_naming_the_field(tmp_path):
    from typer.testing import CliRunner

    from definemed.cli import app

    bad = tmp_path / "filter.yaml"
    bad.write_text(f"output_dir: {tmp_path}/o\nsource: {{path: {tmp_path}}}\nclassifier: {tmp_path}\n"
                   "min_actors: 4\nmax_actors: 2\n")
    res = CliRunner().invoke(app, ["validate", "filter", "--config", str(bad)])
    assert res.exit_code == 2 and "max_actors" in res.output and len(res.output.strip().splitlines()) == 1


def test_partial_runs_from_another_config_are_refused_not_mixed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from definemed.corpus.annotate import check_resumable
    from definemed.corpus.config import AnnotateConfig
    from definemed.corpus.stage import write_sample

    cfg = AnnotateConfig(output_dir=str(tmp_path), source={"path": str(tmp_path)}, sample_size=10)
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "_SAMPLE.json").write_text('{"key": {"sample_size": 99}}')
    with pytest.raises(ConfigError, match="output_dir"):
        write_sample(cfg, tmp_path / "sample", tmp_path / "q")
    ann = tmp_path / "annotations"
    ann.mkdir()
    pq.write_table(pa.table({"model": ["tiny://qwen2"], "prompt_sha": ["aaa"]}), ann / "shard-00000.parquet")
    check_resumable(ann, "tiny://qwen2", "aaa", str(tmp_path))
    with pytest.raises(ConfigError, match="output_dir"):
        check_resumable(ann, "/models/Mixtral", "aaa", str(tmp_path))


def test_length_sorted_micro_batches_return_scores_in_input_order(tiny_xlmr):
    import pyarrow as pa

    from definemed.corpus.score import Scorer

    texts = ["kurz", "ein deutlich längerer Text über Blutdruck und Herzfrequenz", "mittel lang", "Fieber " * 30]
    plain = Scorer(tiny_xlmr, max_length=64)
    chunked = Scorer(tiny_xlmr, max_length=64, micro_batch=2)
    assert np.allclose(plain.score_texts(texts), chunked.score_texts(texts), atol=1e-6)
    out = chunked(pa.table({"id": ["a", "b", "c", "d"], "text": texts}))
    assert out.column_names == ["id", "text", "score"] and out.num_rows == 4
