"""Language confusion measured the way the field measures it: the Language Confusion Benchmark's line-level pass
rate and word-level errors (Marchisio et al. 2024, "Understanding and Mitigating Language Confusion in LLMs").

Per response, as LCB's `compute_metrics`:
- the text is split into lines at line breaks, and lines with fewer than 5 words are dropped;
- each remaining line's language is detected (lingua, offline; LCB uses fastText's lid.176);
- the response passes when every remaining line is in the requested language. A response without a line of 5
  words carries no evidence either way and is *skipped*: it passes `line_pass`, and LPR leaves it out of n;
- word level: within the lines that are in the requested language, lingua's `detect_multiple_languages_of`
  splits the line into single-language runs; the words of runs in another language are confused words.

LPR of a model = passing responses / responses not skipped, with a bootstrap CI over responses. Word confusion
of a model = confused words / words in requested-language lines, pooled over responses (a bootstrap CI over
responses). Both are in [0, 1]; LPR is better high, word confusion better low.

What a line-level rule cannot see: a one-paragraph answer that switches language mid-line passes LPR when the
requested language dominates the line; word confusion and the failure-mode table's sentence-level count
(definemed.eval.failure_modes) see it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from definemed.text import words

#: lingua languages told apart by default: German, English and the languages a German model most often drifts
#: into (LCB's fastText knows 176; a small set keeps short German lines from reading as, say, Afrikaans).
DEFAULT_LANGUAGES = ("GERMAN", "ENGLISH", "FRENCH", "SPANISH", "ITALIAN", "DUTCH", "POLISH", "PORTUGUESE",
                     "TURKISH", "RUSSIAN", "CHINESE")
#: ISO 639-1 codes (OpenAI / Hugging Face convention) to lingua's language names.
LANG_NAMES = {"de": "GERMAN", "en": "ENGLISH", "fr": "FRENCH", "es": "SPANISH", "it": "ITALIAN", "nl": "DUTCH",
              "pl": "POLISH", "pt": "PORTUGUESE", "tr": "TURKISH", "ru": "RUSSIAN", "zh": "CHINESE"}
MIN_LINE_WORDS = 5  # LCB: lines shorter than this are dropped


@functools.lru_cache(maxsize=8)
def detector(languages: tuple[str, ...] = DEFAULT_LANGUAGES):
    """One lingua detector per language set, built once per process (its models load in about 0.4 s)."""
    from lingua import Language, LanguageDetectorBuilder

    langs = {getattr(Language, name.upper()) for name in languages}
    return LanguageDetectorBuilder.from_languages(*sorted(langs, key=lambda x: x.name)).build()


def language_name(lang: str) -> str:
    """'de' -> 'GERMAN'; a lingua name passes through. Unknown codes are a ValueError (one line)."""
    if lang.upper() in LANG_NAMES.values():
        return lang.upper()
    if lang.lower() not in LANG_NAMES:
        raise ValueError(f"unknown language {lang!r}: use one of {', '.join(sorted(LANG_NAMES))}")
    return LANG_NAMES[lang.lower()]


def scored_lines(text: str | None) -> list[str]:
    """The lines LCB scores: split at line breaks, keep lines of at least MIN_LINE_WORDS words that contain a
    letter (a line of numbers has no language)."""
    out = []
    for line in (text or "").splitlines():
        ws = [w for w in words(line) if any(c.isalpha() for c in w)]
        if len(ws) >= MIN_LINE_WORDS:
            out.append(line.strip())
    return out


@dataclass(frozen=True)
class ResponseLanguage:
    """What one response looks like to the metrics."""

    lines: int  # lines scored (>= MIN_LINE_WORDS words)
    foreign_lines: int  # scored lines not in the requested language
    words: int  # words in scored lines that are in the requested language
    foreign_words: int  # of those, words in runs of another language

    @property
    def skipped(self) -> bool:
        return self.lines == 0

    @property
    def passed(self) -> bool:
        return self.foreign_lines == 0

    @property
    def word_confusion(self) -> float:
        return self.foreign_words / self.words if self.words else math.nan


def analyze(text: str | None, lang: str = "de", languages: Sequence[str] = DEFAULT_LANGUAGES) -> ResponseLanguage:
    name = language_name(lang)
    det = detector(tuple(sorted(set(languages) | {name})))
    n_lines = foreign = n_words = confused = 0
    for line in scored_lines(text):
        n_lines += 1
        top = det.detect_language_of(line)
        if top is None or top.name != name:  # LCB counts an undecided line as an error too
            foreign += 1
            continue
        n_words += len(words(line))
        for run in det.detect_multiple_languages_of(line):
            if run.language.name != name:
                confused += len(words(line[run.start_index:run.end_index]))
    return ResponseLanguage(n_lines, foreign, n_words, confused)


def line_pass(text: str | None, lang: str = "de") -> bool:
    """True when every line of at least 5 words is in `lang` (LCB's line-level pass; a response without such a
    line passes, and LPR skips it)."""
    return analyze(text, lang).passed


def word_confusion(text: str | None, lang: str = "de") -> float:
    """Share of the words in `lang` lines that lingua places in another language (nan without such a line)."""
    return analyze(text, lang).word_confusion


def summarize(texts: Iterable[str | None], lang: str = "de", n_boot: int = 1000, seed: int = 0,
              languages: Sequence[str] = DEFAULT_LANGUAGES) -> dict:
    """LPR and word confusion of one model's responses, with 95% bootstrap CIs over responses."""
    import numpy as np

    from definemed.eval.stats import bootstrap_ci, mean_ci

    per = [analyze(t, lang, languages) for t in texts]
    scored = [r for r in per if not r.skipped]
    lpr = mean_ci([float(r.passed) for r in scored], n_boot=n_boot, seed=seed)
    with_words = np.array([[r.foreign_words, r.words] for r in per if r.words], dtype=float).reshape(-1, 2)
    wc = bootstrap_ci(with_words, stat=lambda x: x[:, 0].sum() / x[:, 1].sum(), n_boot=n_boot, seed=seed)
    return {"lang": lang, "responses": len(per), "skipped": len(per) - len(scored),
            "failed": sum(not r.passed for r in scored), "lpr": lpr.as_dict(), "word_confusion": wc.as_dict(),
            "per_response": [asdict(r) for r in per]}
