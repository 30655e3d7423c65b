"""German extractive QA: the bundled set (spans, ids, provenance), SQuAD/MLQA-style EM and F1 on hand examples,
answer extraction, and one-shot prompts that never show the scored item or its document."""
from __future__ import annotations

import json

import pytest

from definemed.eval.qa import (DEFAULT_QA, QAItem, conversation, exact_match, extract_answer, f1_score,
                               load_qa_items, normalize_answer, pick_exemplar, split_items)


# ---------------------------------------------------------------- the bundled set
def test_bundled_set_spans_ids_and_source_documents():
    import pandas as pd

    from definemed.data.sample import SAMPLE_WEB_DIR

    raw = [json.loads(line) for line in open(DEFAULT_QA, encoding="utf-8") if line.strip()]
    for r in raw:  # checked on the raw file, not only through the loader's validator
        assert r["answers"], r["id"]
        for a in r["answers"]:
            assert r["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"], (r["id"], a)
    ids = [r["id"] for r in raw]
    assert len(set(ids)) == len(ids)
    scored, pool = split_items(load_qa_items(DEFAULT_QA))
    assert len(scored) >= 60 and len(pool) >= 4
    # every context is a verbatim passage of the medical sample document it names
    docs = pd.concat([pd.read_parquet(f) for f in sorted(SAMPLE_WEB_DIR.glob("*.parquet"))]).set_index("id")
    for it in scored + pool:
        assert docs.loc[it.doc_id, "gold_label"] == "medical", it.id
        assert it.context in docs.loc[it.doc_id, "text"], it.id
    # exemplars come from documents no scored item uses, so no one-shot prompt can show a scored document
    assert not {e.doc_id for e in pool} & {it.doc_id for it in scored}


def test_an_answer_that_is_not_the_span_at_answer_start_is_refused(tmp_path):
    from pydantic import ValidationError

    from definemed.data.loaders import SourceError

    good = {"id": "x", "doc_id": "d", "context": "Mittel der Wahl ist Amoxicillin.", "question": "Welches Mittel?",
            "answers": [{"text": "Amoxicillin", "answer_start": 20}]}
    assert QAItem.model_validate(good).gold == ["Amoxicillin"]
    with pytest.raises(ValidationError, match="not the context at answer_start 19"):
        QAItem.model_validate({**good, "answers": [{"text": "Amoxicillin", "answer_start": 19}]})
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(SourceError, match="duplicate QA item ids"):
        load_qa_items(f)


# ---------------------------------------------------------------- EM and F1 (SQuAD v1.1 with MLQA's German rules)
def test_normalisation_drops_case_punctuation_german_articles_and_extra_space():
    assert normalize_answer("Die Pfortader (Vena portae).") == "pfortader vena portae"
    assert normalize_answer("„Eine  oft irreversible Ototoxizität“") == "oft irreversible ototoxizität"
    # articles only as whole words: "Dermatologie" and "einerseits" keep their letters
    assert normalize_answer("Verlauf der Dermatologie, einerseits") == "verlauf dermatologie einerseits"
    # MLQA drops every punctuation mark, the German decimal comma and the hyphen included
    assert normalize_answer("4,5 Stunden") == normalize_answer("4.5 Stunden") == "45 stunden"
    assert normalize_answer("HMG-CoA-Reduktase") == "hmgcoareduktase"


def test_exact_match_and_f1_on_hand_examples():
    # an article or a full stop does not cost the exact match
    assert exact_match("der Innenmeniskus", ["Innenmeniskus"]) == 1.0
    assert exact_match("Innenmeniskus.", ["Der Innenmeniskus"]) == 1.0
    assert exact_match("Außenmeniskus", ["Der Innenmeniskus"]) == 0.0
    # F1: pred {pfortader} vs gold {pfortader, vena, portae}: P = 1, R = 1/3, F1 = 2 * 1/3 / (4/3) = 0.5
    assert f1_score("Pfortader", ["die Pfortader (Vena portae)"]) == pytest.approx(0.5)
    # several gold answers: the best one counts (the short variant matches exactly)
    assert f1_score("Pfortader", ["die Pfortader (Vena portae)", "Pfortader"]) == 1.0
    assert exact_match("Pfortader", ["die Pfortader (Vena portae)", "Pfortader"]) == 1.0
    # pred {rivaroxaban, 15, mg, täglich} vs gold {15, mg, zweimal, täglich}: 3 shared, P = R = 3/4
    assert f1_score("Rivaroxaban 15 mg täglich", ["15 mg zweimal täglich"]) == pytest.approx(0.75)
    # repeated tokens count once per gold occurrence: pred {mg x3} vs gold {15, mg}: P = 1/3, R = 1/2, F1 = 0.4
    assert f1_score("mg mg mg", ["15 mg"]) == pytest.approx(0.4)
    assert f1_score("", ["15 mg"]) == 0.0 and exact_match("", ["15 mg"]) == 0.0


def test_answer_extraction_takes_the_first_line_without_a_label():
    assert extract_answer("Antwort: Candida albicans\nDas ist ein Hefepilz.") == "Candida albicans"
    assert extract_answer("\n\n  answer:  Amoxicillin.\n") == "Amoxicillin."
    assert extract_answer("Antwort:\nAdrenalin") == "Adrenalin"
    assert extract_answer("") == "" and extract_answer(None) == ""


# ---------------------------------------------------------------- one-shot prompts
def test_one_shot_prompt_never_shows_the_scored_item_or_its_document():
    scored, pool = split_items(load_qa_items(DEFAULT_QA))
    by_id = {e.id: e for e in pool}
    used = set()
    for it in scored:
        zero = conversation(it, "zero_shot", pool, "System")
        one = conversation(it, "one_shot", pool, "System")
        assert [m["role"] for m in zero] == ["system", "user"]
        assert [m["role"] for m in one] == ["system", "user", "assistant", "user"]
        assert one[-1] == zero[-1] and it.question in one[-1]["content"] and it.context in one[-1]["content"]
        shown = "\n".join(m["content"] for m in one[:-1])
        assert it.question not in shown and it.context not in shown
        ex = pick_exemplar(it, pool)
        assert ex.id in by_id and ex.doc_id != it.doc_id and one[2]["content"] == ex.answers[0].text
        assert pick_exemplar(it, pool) == ex  # the same for every model and run
        used.add(ex.id)
    assert len(used) > 1  # spread over the pool, not one exemplar for every item


def test_no_exemplar_from_another_document_is_an_error():
    from definemed.config import ConfigError

    item = QAItem(id="a", doc_id="d1", context="Adrenalin hilft.", question="Was hilft?",
                  answers=[{"text": "Adrenalin", "answer_start": 0}])
    same_doc = item.model_copy(update={"id": "b", "split": "exemplar"})
    with pytest.raises(ConfigError, match="no one-shot exemplar for a"):
        pick_exemplar(item, [same_doc])


def test_scores_of_one_model_and_the_items_from_documents_it_did_not_train_on():
    from definemed.eval.qa import score_answers

    scored, _ = split_items(load_qa_items(DEFAULT_QA), limit=4)
    answers = {it.id: {"answer": "Antwort: " + it.answers[0].text, "finish_reason": "stop"} for it in scored[:2]}
    answers.update({it.id: {"answer": "weiß nicht", "finish_reason": "length"} for it in scored[2:]})
    r = score_answers(scored, answers, n_boot=100, trained={scored[0].doc_id, scored[2].doc_id})
    assert r["n"] == 4 and r["em"]["value"] == 0.5 and r["f1"]["value"] == 0.5 and r["truncated"] == 2
    assert [p["trained"] for p in r["items"]] == [True, False, True, False]
    assert r["heldout"]["n"] == 2 and r["heldout"]["em"]["value"] == 0.5
    assert "heldout" not in score_answers(scored, answers, n_boot=100)
