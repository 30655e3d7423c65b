"""What a "word" is, once for the whole project: the filter's word counts, decontamination n-grams, MinHash
shingles and the failure-mode metrics (verbosity, spelling, language mixing) all split text with `words`.

A word is a maximal run of letters (any script), with hyphenated compounds kept whole ("Covid-Impfung",
"Magen-Darm-Trakt"). Numbers and punctuation are not words: "2,5 mg/kg" has two ("mg", "kg"), and
"54-jähriger" has one ("jähriger"). This is not a whitespace split, so counts run a little below `len(t.split())`
on numeric text (on the bundled sample, 2.0% below).
"""
from __future__ import annotations

import re

_LETTERS = r"[^\W\d_]+"
WORD_RE = re.compile(rf"{_LETTERS}(?:-{_LETTERS})*")


def words(text: str | None) -> list[str]:
    return WORD_RE.findall(text or "")


def word_count(text: str | None) -> int:
    return sum(1 for _ in WORD_RE.finditer(text or ""))
