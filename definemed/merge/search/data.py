"""The dev and test splits a search scores on: documents of each perplexity set (divided by a seeded hash of their
id) and instruction items (divided by their own `split` field), each asked in English and in German.

The search selects on dev only; the front and the references are re-scored on test (never seen by the search).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from definemed.config import ConfigError
from definemed.merge.search.config import ScoringConfig, SplitData
from definemed.train.split import dev_test_split

Split = Literal["dev", "test"]
LANGS = ("en", "de")


@dataclass
class SplitSet:
    """What one split asks of a model: documents per set, and the instruction items of the split."""

    split: Split
    documents: dict[str, list[tuple[str, str]]]
    items: list = field(default_factory=list)  # InstructionItem

    def describe(self) -> dict:
        return {"split": self.split, "documents": {k: [i for i, _ in v] for k, v in self.documents.items()},
                "prompts": [it.id for it in self.items]}


def load_split(cfg: ScoringConfig, split: Split) -> SplitSet:
    from definemed.data.loaders import load_instruction_items
    from definemed.eval.perplexity import load_set

    sd: SplitData = getattr(cfg, split)
    docs = {}
    for name, sc in cfg.sets.items():
        chosen = dev_test_split(load_set(sc), cfg.split_seed, split, sd.documents)
        if not chosen:
            raise ConfigError(f"invalid config field 'scoring.sets.{name}': no documents fall in the {split} split")
        docs[name] = chosen
    items = load_instruction_items(cfg.prompts, [split])[:sd.prompts]
    if not items:
        raise ConfigError(f"invalid config field 'scoring.prompts': no items with split {split!r} in {cfg.prompts}")
    return SplitSet(split, docs, items)
