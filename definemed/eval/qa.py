"""Extractive question answering in German, scored like SQuAD: does the model find the span in a medical passage
that answers a question about it?

The bundled set (definemed/data/sample/qa/qa_de.jsonl, DATA_CARD.md) was written for this project from the
sample's medical documents, in SQuAD's format: id, doc_id, context, question, answers [{text, answer_start}].
Items with `split: exemplar` are the one-shot pool and are never scored.

Prompting, as in the seed work on distillation for QA: zero-shot (the passage and the question) and one-shot (one
exemplar item and its gold answer first, as a user/assistant turn of the same chat, then the scored item). The
exemplar comes from the pool, never the scored item or another passage of its document; which one is fixed by a
hash of the scored item's id, so every model sees the same exemplar for an item. Answers come through each
model's OpenAI chat route (its own template), greedy, with a short max_tokens.

Answer extraction (`extract_answer`): the first non-empty line of the completion, with a leading "Antwort:" /
"Answer:" label removed; nothing else is cut, because the normalisation below removes punctuation and articles.

Scores, as SQuAD v1.1's evaluation with the German normalisation of MLQA's evaluation script
(mlqa_evaluation_v1.py, lang 'de'): lower-case; remove punctuation (every Unicode P* character and
string.punctuation); remove the German articles ein, eine, einen, einem, eines, einer, der, die, das, den, dem,
des; split on whitespace. Exact match (EM): the normalised prediction equals a normalised gold answer; F1: token
overlap F1 (bag of tokens); each is the maximum over the item's gold answers. A model's EM and F1 are means over
items with 95% bootstrap CIs over items.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from definemed.config import ConfigError, InputPath, StrictModel
from definemed.eval.generate import GenerationConfig

DEFAULT_QA = "definemed/data/sample/qa/qa_de.jsonl"
#: The German instruction of every QA conversation (the system message): answer with the span, not a sentence.
SYSTEM_PROMPT_QA = ("Beantworte die Frage zum Text. Antworte nur mit der kürzesten Textstelle aus dem Text, die "
                    "die Frage beantwortet, wörtlich und ohne ganzen Satz.")
Mode = Literal["zero_shot", "one_shot"]
MODES: tuple[str, ...] = ("zero_shot", "one_shot")


# ---------------------------------------------------------------- items
class QAAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1)
    answer_start: int = Field(ge=0)


class QAItem(BaseModel):
    """One SQuAD-style item; every gold answer must be the context's text at its answer_start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    doc_id: str = Field(min_length=1, description="the sample document the context is a passage of")
    topic: str | None = None
    split: Literal["exemplar", "test"] = "test"
    context: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answers: list[QAAnswer] = Field(min_length=1)

    @field_validator("question", "context")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @model_validator(mode="after")
    def _spans(self) -> "QAItem":
        for i, a in enumerate(self.answers):
            got = self.context[a.answer_start:a.answer_start + len(a.text)]
            if got != a.text:
                raise ValueError(f"answers.{i}: {a.text!r} is not the context at answer_start {a.answer_start} "
                                 f"(found {got!r})")
        return self

    @property
    def gold(self) -> list[str]:
        return [a.text for a in self.answers]


def load_qa_items(path: str | Path) -> list[QAItem]:
    """Every item of a JSONL file (local or any fsspec URI), validated; a bad row is a SourceError naming the file,
    row and field, as the other sample loaders do. Duplicate ids are an error."""
    from definemed.data.loaders import SourceError, _read_records, _refuse_duplicate_ids, resolve_files

    files, fs = resolve_files(str(path), (".jsonl", ".json"))
    items: list[QAItem] = []
    for f in files:
        rows, _ = _read_records(f, fs)
        for i, row in enumerate(rows):
            try:
                items.append(QAItem.model_validate(row))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "item"
                raise SourceError(f"{f}: row {i} (id {row.get('id')!r}): {where}: {err['msg']}") from None
    _refuse_duplicate_ids(path, items, "QA item")
    return items


def split_items(items: Sequence[QAItem], limit: int | None = None) -> tuple[list[QAItem], list[QAItem]]:
    """(scored items, exemplar pool): the pool is never scored; `limit` keeps the first N scored items."""
    scored = [it for it in items if it.split == "test"][:limit]
    pool = [it for it in items if it.split == "exemplar"]
    return scored, pool


# ---------------------------------------------------------------- scoring (SQuAD v1.1, MLQA's German normalisation)
_ARTICLES_DE = re.compile(r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b")


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(s: str) -> str:
    """MLQA's normalisation for German: lower-case, drop punctuation, drop articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if not _is_punct(ch))
    return " ".join(_ARTICLES_DE.sub(" ", s).split())


def _f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token F1, the maximum over the gold answers."""
    return max(_f1(prediction, g) for g in golds)


_LABEL = re.compile(r"^\s*(?:antwort|answer)\s*[:：]\s*", re.IGNORECASE)


def extract_answer(completion: str | None) -> str:
    """The answer in a completion: its first non-empty line, without a leading "Antwort:" label."""
    for line in (completion or "").splitlines():
        line = _LABEL.sub("", line).strip()
        if line:
            return line
    return ""


# ---------------------------------------------------------------- prompts
def user_message(item: QAItem) -> str:
    return f"Text:\n{item.context}\n\nFrage: {item.question}"


def pick_exemplar(item: QAItem, pool: Sequence[QAItem]) -> QAItem:
    """The one-shot exemplar of `item`: a pool item from another document (never the item itself), chosen by a
    hash of the item's id so that it is the same for every model and run."""
    candidates = [e for e in pool if e.id != item.id and e.doc_id != item.doc_id]
    if not candidates:
        raise ConfigError(f"no one-shot exemplar for {item.id}: the pool (split: exemplar) has no item from another "
                          "document")
    h = int(hashlib.sha256(item.id.encode("utf-8")).hexdigest()[:12], 16)
    return candidates[h % len(candidates)]


def conversation(item: QAItem, mode: str, pool: Sequence[QAItem], system_prompt: str | None) -> list[dict[str, str]]:
    """The chat messages of one item: [system], [exemplar user turn, exemplar gold answer], the item's user turn."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if mode == "one_shot":
        ex = pick_exemplar(item, pool)
        msgs += [{"role": "user", "content": user_message(ex)}, {"role": "assistant", "content": ex.answers[0].text}]
    return msgs + [{"role": "user", "content": user_message(item)}]


# ---------------------------------------------------------------- config
class QAGeneration(GenerationConfig):
    """Sampling of the QA answers: greedy and short (an answer is a span of a few words)."""

    system_prompt: None = Field(None, description="set `qa.system_prompt`")
    max_tokens: int = Field(32, ge=1)


class QAConfig(StrictModel):
    """Extractive QA (SQuAD-style EM and F1) through each model's chat route, zero- and one-shot."""

    path: InputPath = Field(DEFAULT_QA, description="JSONL of SQuAD-style items (id, doc_id, context, question, "
                                                    "answers [{text, answer_start}], split: test | exemplar)")
    modes: list[Mode] = Field(default_factory=lambda: list(MODES), min_length=1,
                              description="zero_shot: passage and question; one_shot: an exemplar item and its "
                                          "answer first")
    models: list[str] | None = Field(None, description="models to ask (default: every model)")
    limit: int | None = Field(None, ge=1, description="first N scored items (quick runs)")
    system_prompt: str | None = Field(SYSTEM_PROMPT_QA, description="system message of every QA conversation; "
                                      "None sends none (the model's template default applies)")
    generation: QAGeneration = Field(default_factory=QAGeneration, description="greedy, short max_tokens")
    trained_on: str | None = Field(None, description="a pack stage's output_dir: mark the items whose document "
                                   "it trained on (their passages were CPT / distillation data) and score the "
                                   "others apart")

    @field_validator("modes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("modes must be unique")
        return v

    @model_validator(mode="after")
    def _items(self) -> "QAConfig":
        """The item file is read and checked before any model is asked (it is small): every span, the ids, at
        least one scored item, and a one-shot exemplar from another document for each."""
        from definemed.data.loaders import SourceError, _is_remote

        if _is_remote(str(self.path)) or not Path(self.path).exists():
            return self  # checked where it is read
        try:
            scored, pool = split_items(load_qa_items(self.path), self.limit)
            if not scored:
                raise ValueError(f"path: no scored items (split: test) in {self.path}")
            if "one_shot" in self.modes:
                for it in scored:
                    pick_exemplar(it, pool)
        except (SourceError, ConfigError) as e:
            raise ValueError(f"path: {e}") from None
        return self

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(**{**self.generation.model_dump(), "system_prompt": None})


# ---------------------------------------------------------------- one model's answers
def score_answers(items: Sequence[QAItem], answers: Mapping[str, Mapping[str, Any]], n_boot: int = 1000,
                  seed: int = 0, trained: set[str] | None = None) -> dict[str, Any]:
    """EM and F1 of one model in one mode: means with 95% bootstrap CIs over items, and the per-item scores
    (what a paired comparison of two models resamples). `answers` maps item id -> record with "answer";
    `trained`, the ids of documents the model trained on, adds EM and F1 on the other items (`heldout`)."""
    from definemed.eval.stats import mean_ci

    per = []
    for it in items:
        rec = answers[it.id]
        pred = extract_answer(rec.get("answer"))
        per.append({"id": it.id, "doc_id": it.doc_id, "prediction": pred, "em": exact_match(pred, it.gold),
                    "f1": f1_score(pred, it.gold), "finish_reason": rec.get("finish_reason"),
                    "trained": None if trained is None else it.doc_id in trained})

    def means(rows: list[dict]) -> dict[str, Any]:
        return {"n": len(rows), "em": mean_ci([p["em"] for p in rows], n_boot=n_boot, seed=seed).as_dict(),
                "f1": mean_ci([p["f1"] for p in rows], n_boot=n_boot, seed=seed).as_dict()}

    out = {**means(per), "empty": sum(not p["prediction"] for p in per),
           "truncated": sum(p["finish_reason"] == "length" for p in per), "items": per}
    if trained is not None:
        out["heldout"] = means([p for p in per if not p["trained"]])
    return out
