"""Verifiable instructions: every type passes a hand-written answer that follows it and fails one that does not;
loose vs strict, prompt- vs instruction-level scoring and the language gate on crafted answers."""
from __future__ import annotations

import pytest

from definemed.eval.instructions import (TYPES, InstructionError, PromptResult, accuracies, check, check_loose,
                                         score_answer)

# (instruction, an answer that follows it, an answer that does not): written by hand, at least one per type
CASES = [
    ({"type": "max_words", "n": 12}, "Metformin senkt den Blutzucker und wird bei Typ-2-Diabetes eingesetzt.",
     "Metformin ist ein Medikament aus der Gruppe der Biguanide, das den Blutzucker senkt, indem es die "
     "Glukoseproduktion in der Leber hemmt."),
    ({"type": "min_words", "n": 8}, "Bitte nehmen Sie die Tablette morgens nüchtern mit Wasser ein.",
     "Morgens nüchtern."),
    ({"type": "max_sentences", "n": 2}, "Trinken Sie viel. Bei Fieber über 39 °C melden Sie sich.",
     "Trinken Sie viel. Schonen Sie sich. Bei Fieber über 39 °C melden Sie sich."),
    ({"type": "max_sentences", "n": 2}, "Das z. B. bei Fieber übliche Paracetamol hilft. Es senkt Fieber.",
     "Warnzeichen:\n- Atemnot\n- Brustschmerz"),  # list items count as sentences
    ({"type": "bullets", "n": 3}, "Warnzeichen:\n* Atemnot\n* Brustschmerz\n* Bewusstlosigkeit",
     "Warnzeichen:\n* Atemnot\n* Brustschmerz"),
    ({"type": "bullets", "n": 2}, "- Ruhe\n- Kühlen", "**Ruhe** und **Kühlen**\n---"),  # bold and rules are no bullets
    ({"type": "numbered_steps", "n": 3}, "1. Hände waschen\n2. Wunde spülen\n3. Pflaster aufkleben",
     "1. Hände waschen\n3. Pflaster aufkleben\n2. Wunde spülen"),
    ({"type": "yes_no"}, "Nein.", "Nein, das sollten Sie nicht tun."),
    ({"type": "yes_no", "yes": "Yes", "no": "No"}, "yes", "Ja"),
    ({"type": "json_keys", "keys": ["diagnose", "therapie"]},
     '```json\n{"diagnose": "Pneumonie", "therapie": "Amoxicillin"}\n```',
     '{"diagnose": "Pneumonie", "therapie": "Amoxicillin", "dauer": "7 Tage"}'),
    ({"type": "json_keys", "keys": ["diagnose"]}, '{"diagnose": "Angina pectoris"}', "diagnose: Angina pectoris"),
    ({"type": "include_keyword", "keyword": "Metformin"}, "Die Metformintherapie wird fortgesetzt.",
     "Die Therapie mit Biguaniden wird fortgesetzt."),
    ({"type": "exclude_keyword", "keyword": "Antibiotikum"}, "Ruhe, Flüssigkeit und Paracetamol bei Fieber.",
     "Ein Antibiotikum ist bei Viren nicht sinnvoll."),
    ({"type": "start_with", "phrase": "Kurz gesagt:"}, "  kurz gesagt: Der Wert ist erhöht.",
     "Der Wert ist erhöht. Kurz gesagt: zum Arzt."),
    ({"type": "end_with", "phrase": "Gute Besserung!"}, "Schonen Sie sich. Gute Besserung!",
     "Gute Besserung! Schonen Sie sich."),
    ({"type": "no_comma"}, "Bitte nüchtern bleiben und morgen um acht Uhr kommen.",
     "Bitte nüchtern bleiben, und morgen um acht Uhr kommen."),
    ({"type": "title"}, "<<Blutdruck richtig messen>>\nSitzen Sie ruhig.", "<< >>\nSitzen Sie ruhig."),
    ({"type": "lowercase"}, "bitte trinken sie ausreichend wasser.", "Bitte trinken Sie ausreichend Wasser."),
]


@pytest.mark.parametrize("instruction,good,bad", CASES)
def test_each_type_passes_the_answer_that_follows_it_and_fails_the_one_that_does_not(instruction, good, bad):
    assert check(good, instruction) is True
    assert check(bad, instruction) is False


def test_every_type_has_a_hand_written_case_and_the_required_ids_exist():
    required = {"max_words", "max_sentences", "bullets", "yes_no", "json_keys", "include_keyword", "start_with",
                "no_comma"}
    assert required <= set(TYPES) and len(TYPES) >= 12
    assert {c[0]["type"] for c in CASES} == set(TYPES)


@pytest.mark.parametrize("bad,words", [
    ({"type": "max_wordz", "n": 3}, "unknown instruction type 'max_wordz'"),
    ({"type": "max_words"}, "'max_words': n: Field required"),
    ({"type": "max_words", "n": 0}, "greater than or equal to 1"),
    ({"type": "no_comma", "n": 2}, "Extra inputs are not permitted"),
    ({"type": "json_keys", "keys": ["a", "a"]}, "keys must be unique"),
    ({"n": 3}, "an instruction is a dict with a 'type'"),
])
def test_bad_instructions_are_one_line_errors(bad, words):
    with pytest.raises(InstructionError) as e:
        check("x", bad)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_loose_forgives_a_preamble_a_closing_line_and_markdown_but_strict_does_not():
    answer = "Gerne, hier ist die Antwort:\n**Ja**\nIch hoffe, das hilft."
    assert not check(answer, {"type": "yes_no"}) and check_loose(answer, {"type": "yes_no"})
    starts = "Hier meine Antwort.\nKurz gesagt: Ruhe und Flüssigkeit."
    assert not check(starts, {"type": "start_with", "phrase": "Kurz gesagt:"})
    assert check_loose(starts, {"type": "start_with", "phrase": "Kurz gesagt:"})
    # loose is not "anything goes": a wrong answer stays wrong in every variant
    assert not check_loose("Vielleicht.\nEher nicht.", {"type": "yes_no"})


def test_prompt_and_instruction_level_strict_and_loose_and_the_language_gate():
    both = [{"type": "include_keyword", "keyword": "Ibuprofen"}, {"type": "max_words", "n": 20}]
    r_ok = score_answer("a", "Ibuprofen hilft gegen Schmerzen und Fieber bei Erwachsenen.", both, lang="de")
    r_half = score_answer("b", "Paracetamol hilft gegen Schmerzen.", both, lang="de")
    r_en = score_answer("c", "Ibuprofen helps against pain and fever in most adults.", both, lang="de")
    assert r_ok.strict == (True, True) and r_half.strict == (False, True) and r_en.strict == (True, True)
    assert r_ok.gated and not r_half.gated and not r_en.gated  # English answer: instructions pass, gate fails
    acc = accuracies([r_ok, r_half, r_en], n_boot=50)
    assert acc["prompt_strict"]["value"] == pytest.approx(2 / 3)
    assert acc["instruction_strict"]["value"] == pytest.approx(5 / 6)
    assert acc["gated"]["value"] == pytest.approx(1 / 3)
    assert 0 <= acc["prompt_strict"]["lo"] <= acc["prompt_strict"]["value"] <= acc["prompt_strict"]["hi"] <= 1
    no_gate = accuracies([PromptResult("x", (True,), (True,))], n_boot=50)
    assert "gated" not in no_gate and no_gate["prompt_loose"]["value"] == 1.0
