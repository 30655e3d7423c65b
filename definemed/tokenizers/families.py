"""Model families and the tokenizer each one uses: what `definemed plan` turns words into tokens with.

A family is named after the models our users continue pre-training; `measured_by` is the offline tokenizer source
(definemed.tokenizers.sources) whose measurement stands for the family, or None where no tokenizer of the family is
available offline (Qwen2.5): the plan then says "not measured" and gives no number.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    key: str
    label: str
    tokenizer: str  # which tokenizer the family's models ship, in words
    patterns: tuple[str, ...]  # regexes matched (case-insensitively) against a model path or hub id
    measured_by: str | None  # the offline source standing for the family, or None
    note: str = ""


FAMILIES: dict[str, ModelFamily] = {f.key: f for f in [
    ModelFamily("mistral-7b-v0.3", "Mistral-7B-Instruct-v0.3", "Mistral v3 SentencePiece, 32,768 pieces",
                (r"mistral-7b(-instruct)?-v0\.3",),
                "mistral_common:mistral_instruct_tokenizer_240323.model.v3"),
    ModelFamily("mistral-small", "Mistral-Small-24B", "Tekken (tiktoken-style BPE), 131,072 entries",
                (r"mistral-small",), "mistral_common:tekken_240911.json",
                note="measured with mistral_common's tekken_240911.json; Mistral-Small-24B ships a later tekken.json "
                     "(more control tokens), assumed here to share its 131,072-entry vocabulary"),
    ModelFamily("gemma-3", "Gemma 3", "Gemma 3 SentencePiece, 262,144 pieces", (r"gemma-?3",), "real://gemma-3-270m"),
    ModelFamily("smollm2", "SmolLM2", "SmolLM2 byte-level BPE, 49,152 entries", (r"smollm2",),
                "real://smollm2-135m-instruct"),
    ModelFamily("qwen2.5", "Qwen2.5", "Qwen2 byte-level BPE (not available offline)", (r"qwen2\.5",), None,
                note="no Qwen2.5 tokenizer is available offline (the tiny Qwen2 tokenizer is trained on the bundled "
                     "text and is not Qwen2.5's); measure it where the model is: a tokenizers entry "
                     "{name: qwen2.5, source: /models/Qwen2.5-7B-Instruct, family: qwen2.5}"),
]}


def family_of(model: str | None) -> ModelFamily | None:
    """The family a model path or hub id belongs to, by its name; None when no family matches."""
    if not model:
        return None
    s = str(model)
    for fam in FAMILIES.values():
        if any(re.search(p, s, flags=re.IGNORECASE) for p in fam.patterns):
            return fam
    return None


def check_family(key: str) -> str:
    if key not in FAMILIES:
        raise ValueError(f"unknown model family '{key}', choose one of {sorted(FAMILIES)}")
    return key
