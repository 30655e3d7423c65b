"""Fertility, split share and parity: the definitions, once.

- A word is a `definemed.text.words` word (runs of letters or of digits; hyphenated compounds whole).
- **Fertility** of a tokenizer on a set = (tokens of all its texts) / (words of all its texts), each text tokenized
  whole and without special tokens. Every token counts, punctuation and whitespace tokens included: fertility is
  what a word of the set costs in tokens.
- **Split share** = (words split into 2 or more tokens) / words. A token is attributed to every word whose
  character span it overlaps by at least one character, by the token's offsets in the running text (its leading
  space is not part of the word, so " Patient" overlaps "Patient" and a lone space token overlaps nothing). A word
  is split when 2 or more tokens are attributed to it. Texts whose tokens cannot be mapped back to characters
  (a tokenizer that normalises the text) are left out of the split share and counted as `unaligned`.
- **Parity** (Petrov et al. 2023, "Language Model Tokenizers Introduce Unfairness Between Languages"): on parallel
  sentences, (tokens of all German sentences) / (tokens of all their English translations): the ratio of totals,
  as the paper's premium and its code (one tokenization length per language over the whole FLORES-200 set, divided
  by English's). 1 = parity; 1.3 = German costs 30% more tokens than the same content in English. Sentences are
  tokenized one at a time (the paper joins them with spaces), so each pair is a bootstrap unit.
- Confidence intervals: the project's percentile bootstrap (definemed.eval.stats.bootstrap_ci) over documents
  (fertility) or sentence pairs (parity), the statistic recomputed as a ratio of totals on every resample. For sets
  larger than `ci_sample` items the resamples draw from a seeded uniform sample of that many items (reservoir
  sampling), which keeps memory flat and makes the interval wider, never narrower.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from definemed.text import word_spans

Span = tuple[int, int]


def tokens_per_word(words: Sequence[Span], tokens: Sequence[Span]) -> list[int]:
    """How many tokens are attributed to each word: tokens overlapping the word's characters."""
    ends = [e for _, e in words]
    counts = [0] * len(words)
    for s, e in tokens:
        if e <= s:
            continue
        i = bisect_right(ends, s)  # the first word ending after the token starts
        while i < len(words) and words[i][0] < e:
            counts[i] += 1
            i += 1
    return counts


def split_count(words: Sequence[Span], tokens: Sequence[Span]) -> int:
    """Words split into 2 or more tokens."""
    return sum(1 for n in tokens_per_word(words, tokens) if n >= 2)


def ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


class Reservoir:
    """A seeded uniform sample of at most `size` rows (Vitter's algorithm R) for the bootstrap."""

    def __init__(self, size: int, width: int, seed: int = 0):
        self.size, self.rows, self.seen = size, np.zeros((size, width), dtype=np.int64), 0
        self.rng = np.random.default_rng(seed)

    def add(self, row: Sequence[int]) -> None:
        if self.seen < self.size:
            self.rows[self.seen] = row
        else:
            j = int(self.rng.integers(0, self.seen + 1))
            if j < self.size:
                self.rows[j] = row
        self.seen += 1

    def sample(self) -> np.ndarray:
        return self.rows[: min(self.seen, self.size)]


@dataclass
class Totals:
    """Counts of one tokenizer on one set, summed as the texts stream by."""

    texts: int = 0
    words: int = 0
    tokens: int = 0
    split_words: int = 0
    aligned_words: int = 0  # words of texts whose token offsets were known (the split share's denominator)
    unaligned_texts: int = 0

    def add(self, words: Sequence[Span], n_tokens: int, spans: Sequence[Span] | None) -> None:
        self.texts += 1
        self.words += len(words)
        self.tokens += n_tokens
        if spans is None:
            self.unaligned_texts += 1
        else:
            self.aligned_words += len(words)
            self.split_words += split_count(words, spans)

    @property
    def fertility(self) -> float:
        return ratio(self.tokens, self.words)

    @property
    def split_share(self) -> float:
        return ratio(self.split_words, self.aligned_words)

    def as_dict(self) -> dict[str, Any]:
        return {"texts": self.texts, "words": self.words, "tokens": self.tokens, "fertility": self.fertility,
                "split_words": self.split_words, "split_share": self.split_share,
                "unaligned_texts": self.unaligned_texts}


def ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """sum(num) / sum(den) with the project's bootstrap CI over the rows."""
    from definemed.eval.stats import bootstrap_ci

    x = np.stack([num, den], axis=1).astype(float)
    est = bootstrap_ci(x, stat=lambda r: ratio(r[:, 0].sum(), r[:, 1].sum()), n_boot=n_boot, seed=seed)
    return {"lo": est.lo, "hi": est.hi, "n": est.n}


@dataclass
class SetMeasure:
    """One pass over a set for several tokenizers at once: every text is split into words once and tokenized by
    each tokenizer. Parallel sets add the English side and the per-pair counts parity needs."""

    names: list[str]
    parallel: bool
    ci_sample: int = 20000
    seed: int = 0
    src: dict[str, Totals] = field(default_factory=dict)
    ref: dict[str, Totals] = field(default_factory=dict)
    reservoir: Reservoir | None = None

    def __post_init__(self):
        self.src = {n: Totals() for n in self.names}
        self.ref = {n: Totals() for n in self.names} if self.parallel else {}
        # row: words, tokens per tokenizer [, English words, English tokens per tokenizer]
        width = (1 + len(self.names)) * (2 if self.parallel else 1)
        self.reservoir = Reservoir(self.ci_sample, width, self.seed)

    def add_batch(self, counters: list, texts: list[str], refs: list[str] | None = None) -> None:
        """Count a batch of texts (and, for a parallel set, their translations `refs`, row for row)."""
        sides = [(texts, self.src)] + ([(refs or [], self.ref)] if self.parallel else [])
        rows: list[list[int]] = [[] for _ in texts]
        for side_texts, totals in sides:
            if len(side_texts) != len(texts):
                raise ValueError("a parallel batch needs one translation per text")
            words = [word_spans(t) for t in side_texts]
            for i, w in enumerate(words):
                rows[i].append(len(w))
            for c in counters:
                for i, (n, spans) in enumerate(c.encode(side_texts)):
                    totals[c.name].add(words[i], n, spans)
                    rows[i].append(n)
        for row in rows:
            self.reservoir.add(row)

    def _column(self, name: str, side: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, words) per sampled item for tokenizer `name` on side 0 (German) or 1 (English)."""
        k = len(self.names)
        rows, base = self.reservoir.sample(), side * (1 + k)
        return rows[:, base + 1 + self.names.index(name)], rows[:, base]

    def results(self, n_boot: int = 1000) -> dict[str, dict[str, Any]]:
        """Per tokenizer: the totals, fertility with its CI and, for a parallel set, English fertility and
        parity with its CI."""
        out: dict[str, dict[str, Any]] = {}
        sampled = min(self.reservoir.seen, self.reservoir.size)
        for name in self.names:
            r = self.src[name].as_dict()
            tok, words = self._column(name, 0)
            ci = ratio_ci(tok, words, n_boot, self.seed)
            r.update(fertility_lo=ci["lo"], fertility_hi=ci["hi"], ci_items=sampled)
            if self.parallel:
                en = self.ref[name]
                tok_en, _ = self._column(name, 1)
                pci = ratio_ci(tok, tok_en, n_boot, self.seed)
                r.update(words_en=en.words, tokens_en=en.tokens, fertility_en=en.fertility,
                         split_share_en=en.split_share, parity=ratio(self.src[name].tokens, en.tokens),
                         parity_lo=pci["lo"], parity_hi=pci["hi"])
            out[name] = r
        return out
