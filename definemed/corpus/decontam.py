"""Decontamination: drop documents that contain an evaluation item: MC benchmark questions with their choices,
and the judge prompts.

Two rules, each counted in the stats:
- `ngram`: the document shares a word n-gram (default 13, as in the GPT-3/Llama reports) with the item;
- `whole_item`: items shorter than n words (a short MC question with one-word choices) are matched whole: the
  document contains the item's entire normalised word sequence. Items shorter than `min_item_words` are too
  generic to match either way ("Was ist Fieber?"); they are counted, not silently ignored.
Words are `definemed.text.words`, lower-cased. N-grams are stored as 64-bit blake2b hashes (stable across
processes, unlike Python's hash()).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from definemed.text import words as _words

if TYPE_CHECKING:
    pass

RULES = ("ngram", "whole_item")


def normalised_words(text: str) -> list[str]:
    """The project's words (definemed.text), lower-cased: what n-grams compare."""
    return [w.lower() for w in _words(text)]


def _h(gram: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=8).digest(), "big")


@dataclass
class NgramIndex:
    n: int
    min_item_words: int = 8
    grams: dict[int, str] = field(default_factory=dict)  # n-gram hash -> first item id
    first_words: set[str] = field(default_factory=set)  # cheap pre-check before hashing a position
    # whole_item rule: item length -> {hash of the whole item -> item id}, and first words per length
    whole: dict[int, dict[int, str]] = field(default_factory=dict)
    whole_first: dict[int, set[str]] = field(default_factory=dict)
    items: int = 0
    covered: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RULES})
    too_short: int = 0

    def add(self, item_id: str, text: str) -> None:
        w = normalised_words(text)
        self.items += 1
        if len(w) >= self.n:
            self.covered["ngram"] += 1
            for i in range(len(w) - self.n + 1):
                self.grams.setdefault(_h(w[i:i + self.n]), item_id)
                self.first_words.add(w[i])
        elif len(w) >= self.min_item_words:
            self.covered["whole_item"] += 1
            self.whole.setdefault(len(w), {}).setdefault(_h(w), item_id)
            self.whole_first.setdefault(len(w), set()).add(w[0])
        else:
            self.too_short += 1

    def match_rule(self, text: str) -> tuple[str, str] | None:
        """(item id, rule) of the first matching item, or None."""
        w = normalised_words(text)
        for i in range(len(w) - self.n + 1):
            if w[i] in self.first_words:
                hit = self.grams.get(_h(w[i:i + self.n]))
                if hit is not None:
                    return hit, "ngram"
        for k, table in self.whole.items():
            first = self.whole_first[k]
            for i in range(len(w) - k + 1):
                if w[i] in first:
                    hit = table.get(_h(w[i:i + k]))
                    if hit is not None:
                        return hit, "whole_item"
        return None

    def match(self, text: str) -> str | None:
        m = self.match_rule(text)
        return m[0] if m else None

    def info(self) -> dict:
        return {"ngram": self.n, "min_item_words": self.min_item_words, "items": self.items,
                "items_by_rule": dict(self.covered), "items_too_short": self.too_short, "ngrams": len(self.grams)}


def build_index(items: Iterable[tuple[str, str]], n: int, min_item_words: int = 8) -> NgramIndex:
    idx = NgramIndex(n, min_item_words)
    for item_id, text in items:
        idx.add(item_id, text)
    return idx


def eval_items(mc_configs, prompt_paths) -> list[tuple[str, str]]:
    """(id, text) of every evaluation item, via the shared loaders."""
    from definemed.data.loaders import load_mc_items, load_prompts

    out = []
    for mc in mc_configs:
        for it in load_mc_items(mc):
            out.append((it.id, it.question + "\n" + "\n".join(it.choices)))
    for p in prompt_paths:
        for pr in load_prompts(p):
            out.append((f"prompt/{pr.id}", pr.prompt))
    return out


_CACHE: dict[str, NgramIndex] = {}


def _index(index) -> NgramIndex:
    """`index` may be an ObjectRef: fetched once per worker process, not shipped with every task."""
    if isinstance(index, NgramIndex):
        return index
    import ray

    key = index.hex()
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = ray.get(index)
    return _CACHE[key]


def mark_contaminated(batch, index):
    """map_batches step: adds `contaminated_by` (the first matching item id, or None) and `contaminated_rule`."""
    import pyarrow as pa

    index = _index(index)
    texts = batch.column("text").to_pylist() if isinstance(batch, pa.Table) else batch["text"].tolist()
    hits = [index.match_rule(t) for t in texts]
    by = [h[0] if h else None for h in hits]
    rule = [h[1] if h else None for h in hits]
    if isinstance(batch, pa.Table):
        return (batch.append_column("contaminated_by", pa.array(by, type=pa.string()))
                .append_column("contaminated_rule", pa.array(rule, type=pa.string())))
    batch = batch.copy()
    batch["contaminated_by"], batch["contaminated_rule"] = by, rule
    return batch
