"""Language confusion the LCB way: line-level pass against a hand-labelled set, word-level confusion, and the
model-level rates with their CIs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from definemed.eval.language import analyze, line_pass, scored_lines, summarize, word_confusion

LABELLED = Path(__file__).parent / "data" / "lpr_labelled.jsonl"


def _labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_line_pass_agrees_with_the_hand_labelled_answers():
    rows = _labelled()
    kinds = {r["kind"] for r in rows}
    assert len(rows) >= 20 and {"german", "english", "mixed_lines"} <= kinds
    wrong = [(r["id"], r["label"]) for r in rows if line_pass(r["text"], "de") != r["label"]]
    assert not wrong, f"line_pass disagrees with the hand labels on {wrong}"


def test_lines_under_five_words_are_not_scored_and_an_answer_without_any_is_skipped():
    assert scored_lines("Ja\n\n* EKG\n* Troponin bestimmen\n123 456 789 101 112 131") == []
    r = analyze("Ja, sofort.")
    assert r.skipped and r.passed and math.isnan(r.word_confusion)
    # an English line of five words fails a German answer; a two-word English line does not count
    assert not line_pass("Die Therapie wird fortgesetzt wie besprochen.\nPlease call your doctor tomorrow.")
    assert line_pass("Die Therapie wird fortgesetzt wie besprochen.\nThank you!")


def test_word_confusion_counts_foreign_words_inside_german_lines_only():
    clean = "Metformin senkt den Blutzucker, indem es die Glukoseproduktion in der Leber hemmt."
    assert word_confusion(clean) == 0.0
    mixed = "Der Patient hat seit gestern chest pain and shortness of breath und zusätzlich leichtes Fieber."
    r = analyze(mixed)
    assert r.passed and 0.2 < r.word_confusion < 0.6  # the line is German; its English words are confusion
    english = "The patient should take the tablet every morning with a glass of water."
    assert not analyze(english).passed and analyze(english).words == 0  # a foreign line is LPR's, not word's
    assert word_confusion(english, "en") == 0.0


def test_summarize_rates_with_cis_skip_short_answers():
    texts = ["Bitte nehmen Sie die Tablette morgens mit Wasser ein.",
             "Please take the tablet in the morning with water.",
             "Ja",
             "Der Patient hat seit gestern chest pain and shortness of breath und zusätzlich leichtes Fieber."]
    s = summarize(texts, "de", n_boot=200)
    assert s["responses"] == 4 and s["skipped"] == 1 and s["failed"] == 1
    assert s["lpr"]["value"] == pytest.approx(2 / 3) and s["lpr"]["n"] == 3
    assert 0 <= s["lpr"]["lo"] <= s["lpr"]["value"] <= s["lpr"]["hi"] <= 1
    foreign = sum(r["foreign_words"] for r in s["per_response"])
    total = sum(r["words"] for r in s["per_response"])
    assert s["word_confusion"]["value"] == pytest.approx(foreign / total) and foreign > 0


def test_unknown_language_is_one_line():
    with pytest.raises(ValueError) as e:
        line_pass("Hallo Welt wie geht es dir", "xx")
    assert "unknown language 'xx'" in str(e.value) and "\n" not in str(e.value)
