"""Decontamination: drop documents sharing a long word n-gram (default 13, as in GPT-3/Llama reports) with any
evaluation item: MC benchmark questions with their choices, and the judge prompts.

Items with fewer than n words cannot be matched this way; they are counted and reported, not silently ignored.
N-grams are stored as 64-bit blake2b hashes (stable across processes, unlike Python's hash()).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import pandas as pd

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _h(gram: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=8).digest(), "big")


@dataclass
class NgramIndex:
    n: int
    grams: dict[int, str] = field(default_factory=dict)  # n-gram hash -> first item id
    first_words: set[str] = field(default_factory=set)  # cheap pre-check before hashing a position
    items: int = 0
    too_short: int = 0

    def add(self, item_id: str, text: str) -> None:
        w = words(text)
        self.items += 1
        if len(w) < self.n:
            self.too_short += 1
            return
        for i in range(len(w) - self.n + 1):
            self.grams.setdefault(_h(w[i:i + self.n]), item_id)
            self.first_words.add(w[i])

    def match(self, text: str) -> str | None:
        w = words(text)
        for i in range(len(w) - self.n + 1):
            if w[i] in self.first_words:
                hit = self.grams.get(_h(w[i:i + self.n]))
                if hit is not None:
                    return hit
        return None


def build_index(items: Iterable[tuple[str, str]], n: int) -> NgramIndex:
    idx = NgramIndex(n)
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


def mark_contaminated(df: "pd.DataFrame", index) -> "pd.DataFrame":
    """map_batches step: adds `contaminated_by` (the first matching item id, or None). `index` may be an
    ObjectRef: fetched once per worker process, not shipped with every task."""
    if not isinstance(index, NgramIndex):
        import ray

        key = index.hex()
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = ray.get(index)
        index = _CACHE[key]
    df = df.copy()
    df["contaminated_by"] = [index.match(t) for t in df["text"]]
    return df
