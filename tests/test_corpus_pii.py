"""German clinical PII: recall on a planted set, and medical text that must survive unchanged."""
from __future__ import annotations

from pathlib import Path

import pytest

from definemed.corpus.pii import KINDS, redact

MEDICAL = [
    "Morbus Crohn und Colitis ulcerosa sind chronisch-entzündliche Darmerkrankungen (ICD-10 K50.9, K51.9).",
    "Beim Morbus Parkinson helfen L-Dopa und Dopaminagonisten; der Parkinson-Patient braucht Physiotherapie.",
    "Die Patientin erhielt Metformin 1000 mg zweimal täglich, HbA1c 7,2 %, CRP 12 mg/l, Kreatinin 1,1 mg/dl.",
    "Der Patient bekam Dexamethason 10 mg i.v. und Ceftriaxon 2 g; OPS 8-831.0, Leitlinie 2021 (AWMF 2023).",
    "Heparin 5000 IE s.c., 10000 Einheiten pro Tag; RR 135/85 mmHg, Puls 88/min, Temperatur 38,5 °C.",
    "Nach der S3-Leitlinie von 2019 wird bei Hashimoto-Thyreoiditis Levothyroxin 50 µg gegeben.",
    "Die Alzheimer-Demenz und das Guillain-Barré-Syndrom wurden 1906 bzw. 1916 beschrieben.",
    "Laborwerte vom 12.03.2024: Hb 13,5 g/dl, Leukozyten 7.800/µl, Thrombozyten 250.000/µl.",
    "Herr Doktor, wann darf der Patient nach der Appendektomie wieder Sport treiben?",
    "Die Studie schloss 20000 Patienten ein; Kontrolle nach 12 Wochen, Follow-up 2025.",
    # what the widened address and role rules must leave alone
    "Verlegung auf Station 4, Zimmer 12; Stadium 3, 20000 Patienten im Register, Typ 2 Diabetes seit 2010.",
    "Daraufhin hat der Kardiologe Untersuchungen veranlasst und die Hausärztin Blut abgenommen.",
    "Die Mutter Kind Beziehung und der Vater Sohn Konflikt wurden in der Familientherapie besprochen.",
    "Die Tochter erhielt Ibuprofen 400 mg, der Sohn Paracetamol 500 mg; die Ehefrau Metamizol 500 mg.",
    "Der Neurologe Befund: keine Paresen. Trisomie 21, Stufe 2, Grad 3, Tag 14, Woche 38 (SSW).",
    "Befund an Dr. med. K., Fachärztin für Allgemeinmedizin; Versicherte: keine Zuzahlung 2024.",
]
LETTERS = Path(__file__).parent / "data" / "pii_de_letters.jsonl"


def _redacted_chars(text: str, red: str) -> list[bool]:
    """Which characters of `text` redaction removed, from an alignment of the two strings."""
    import difflib

    gone = [True] * len(text)
    for op, i1, i2, _, _ in difflib.SequenceMatcher(None, text, red, autojunk=False).get_opcodes():
        if op == "equal":
            gone[i1:i2] = [False] * (i2 - i1)
    return gone


def test_recall_on_independent_german_letters_with_labelled_spans():
    """Discharge, referral and insurance letters, lab reports and other correspondence (tests/data, DATA_CARD.md),
    written apart from the synthetic generator; a span is found when >= 80% of its letters and digits are gone,
    and nothing outside the labelled spans may go."""
    import json

    rows = [json.loads(line) for line in LETTERS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 40 and len({r["style"] for r in rows}) >= 4
    found = total = 0
    misses, extra = [], []
    for r in rows:
        text = r["text"]
        gone = _redacted_chars(text, redact(text)[0])
        labelled = [False] * len(text)
        for span in r["spans"]:
            starts = [i for i in range(len(text)) if text.startswith(span["text"], i)]
            assert starts, (r["id"], span)
            for i in starts:
                idx = [j for j in range(i, i + len(span["text"])) if text[j].isalnum()]
                labelled[i:i + len(span["text"])] = [True] * len(span["text"])
                total += 1
                hit = sum(gone[j] for j in idx) >= 0.8 * len(idx)
                found += hit
                if not hit:
                    misses.append((r["id"], span["kind"], span["text"]))
        if any(g and not lab and ch.isalnum() for g, lab, ch in zip(gone, labelled, text)):
            extra.append(r["id"])
    assert total >= 200 and found / total >= 0.95, misses
    assert len(extra) <= 0.05 * len(rows), extra


def test_planted_german_pii_recall_is_at_least_95_percent():
    from definemed.corpus.synthetic import planted_pii_set

    expected = {k: 0 for k in KINDS}
    found = {k: 0 for k in KINDS}
    for text, counts in planted_pii_set(300, seed=3):
        red, got = redact(text)
        for k, v in counts.items():
            expected[k] += v
            found[k] += min(v, got[k])
        assert "@" not in red
    recall = sum(found.values()) / sum(expected.values())
    per_kind = {k: found[k] / expected[k] for k in KINDS if expected[k]}
    assert recall >= 0.95, per_kind
    assert set(per_kind) >= {"name", "address", "date_of_birth", "kvnr", "iban", "tax_id", "phone", "email"}


def test_each_kind_has_its_tag_and_check_digits_decide():
    text = ("Patientin Anna Schmidt, geb. 03.04.1961, wohnhaft Lindenstraße 12a, 10115 Berlin. KVNR A123456780, "
            "IBAN DE89 3704 0044 0532 0130 00, Steuer-ID 36 574 261 809, Tel. 030 1234567, a.schmidt@beispiel.de")
    red, c = redact(text)
    assert c == {"email": 1, "iban": 1, "kvnr": 1, "tax_id": 1, "ip": 0, "date_of_birth": 1, "phone": 1,
                 "address": 2, "name": 1}
    for tag in ("<NAME>", "<DATE_OF_BIRTH>", "<ADDRESS>", "<KVNR>", "<IBAN>", "<TAX_ID>", "<PHONE>", "<EMAIL>"):
        assert tag in red
    # one wrong digit each: not a KVNR, IBAN or tax ID
    wrong = "KVNR A123456781, IBAN DE88 3704 0044 0532 0130 00, Steuer-ID 36 574 261 808"
    _, c = redact(wrong)
    assert c["kvnr"] == c["iban"] == c["tax_id"] == 0
    assert redact("Frau Meyer geb. Schulz")[0] == "Frau <NAME> geb. <NAME>"  # maiden name
    assert redact("Pat. Dr. med. Hans-Peter von Arnim, * 1.2.1950")[0] == "Pat. Dr. med. <NAME>, * <DATE_OF_BIRTH>"


@pytest.mark.parametrize("text", MEDICAL)
def test_medical_text_survives(text):
    assert redact(text) == (text, {k: 0 for k in KINDS})


def test_at_most_one_percent_of_bundled_medical_docs_change():
    from definemed.data.loaders import read_web_pandas, sample_web_config

    df = read_web_pandas(sample_web_config())
    med = df[df["gold_label"] == "medical"]["text"]
    changed = sum(redact(t)[0] != t for t in med)
    assert len(med) >= 100 and changed / len(med) <= 0.01, changed
