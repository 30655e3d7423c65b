"""Language-mix detector and typo counter on crafted German, English and mixed texts."""
from __future__ import annotations

import pytest

from definemed.eval.failure_modes import (LanguageMixDetector, TypoCounter, analyze_model, split_sentences,
                                          word_count)

DE = ("Bei akuten Brustschmerzen sollten Sie sofort den Notruf 112 wählen. Apixaban hemmt direkt den Faktor Xa "
      "und wird zweimal täglich eingenommen. Metoprolol ist ein Betablocker. Die Nierenfunktion muss regelmäßig "
      "kontrolliert werden.")
EN = ("Chest pain can have many causes. You should call an ambulance if the pain spreads to your arm. "
      "Take the medication twice a day with water.")
MIXED = (DE + " However, the patient should also be monitored closely for bleeding complications. "
         "Danach erfolgt eine Kontrolle beim Hausarzt in zwei Wochen.")


@pytest.fixture(scope="module")
def lang():
    return LanguageMixDetector()


@pytest.fixture(scope="module")
def typo():
    return TypoCounter()


def test_sentence_split():
    assert split_sentences("Erstens. Zweitens ist gut!\n- Punkt drei\nVier?") == [
        "Erstens.", "Zweitens ist gut!", "- Punkt drei", "Vier?"]


def test_language_mix(lang):
    assert lang.foreign_sentences(DE) == []
    assert not lang.is_mixed(DE)
    en = lang.foreign_sentences(EN)
    assert len(en) == 3 and {l for _, l in en} == {"ENGLISH"}
    mixed = lang.foreign_sentences(MIXED)
    assert mixed == [("However, the patient should also be monitored closely for bleeding complications.",
                      "ENGLISH")]
    # a Chinese phrase inside a German sentence (a known Qwen failure) counts however short
    assert lang.foreign_sentences("Der Patient erhielt 这是一个测试 und Ibuprofen.")[0][1] == "FOREIGN_SCRIPT"
    # short sentences and drug-name-heavy ones carry no language evidence and are not counted
    assert not lang.is_mixed("EKG und Troponin. Ramipril, Metoprolol, Atorvastatin.")


def test_typos(typo):
    clean = ("Die Brustschmerzen wurden mit einer Apixabantherapie und Ibuprofen-Tabletten behandelt. Das EKG "
             "zeigte ST-Hebungen; der Kopfschmerztablette folgte eine Blutdruckmessung im Herzkatheterlabor. "
             "Metoprolol, Ramipril und Empagliflozin wurden fortgesetzt.")
    assert typo.typos(clean) == []
    planted = "Der Patinet hat Kopfschmrzen und nimmt Medikamnete gegen Bluthochdruk."
    assert typo.typos(planted) == ["Patinet", "Kopfschmrzen", "Medikamnete", "Bluthochdruk"]
    assert typo.count("Apixaban und Apixabn") == 1  # a misspelled drug name is still a typo


def test_analyze_model_row(lang, typo):
    fm = analyze_model("m", [DE, EN, MIXED, "Der Patinet ist stabil."], lang, typo,
                       flags={"hallucination": 1, "overconfidence": 0, "contradiction": 2})
    row = fm.row()
    assert row["answers"] == 4 and row["language_mixing"] == 2
    assert row["typos"] == 1 and row["answers_with_typos"] == 1
    assert row["hallucination"] == 1 and row["contradiction"] == 2
    assert fm.words == [word_count(t) for t in (DE, EN, MIXED, "Der Patinet ist stabil.")]
