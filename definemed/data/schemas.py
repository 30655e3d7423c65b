"""Column names and record types shared by the loaders, the bundled sample and the stages that read them."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

#: FineWeb2's own columns (HuggingFaceFW/fineweb-2, e.g. data/deu_Latn/train/*.parquet), in its order.
FINEWEB2_COLUMNS: tuple[str, ...] = (
    "text", "id", "dump", "url", "date", "file_path",
    "language", "language_score", "language_script", "minhash_cluster_size",
)
#: Extra columns of the bundled sample: the human gold label ("medical" | "non_medical") and its reason.
SAMPLE_EXTRA_COLUMNS: tuple[str, ...] = ("topic", "gold_label", "gold_rationale")
SAMPLE_WEB_COLUMNS: tuple[str, ...] = FINEWEB2_COLUMNS + SAMPLE_EXTRA_COLUMNS
GOLD_LABELS: tuple[str, ...] = ("medical", "non_medical")

#: Rows of the bundled malformed file (data/sample/malformed/malformed.parquet) carry one of these in
#: its `malformed_kind` column. "ok" is a well-formed control row that ingest must keep.
MALFORMED_KINDS: tuple[str, ...] = ("empty", "whitespace", "null", "wrong_type", "oversized", "ok")

LETTERS = "ABCDEFGHIJ"


class MCItem(BaseModel):
    """One multiple-choice item, whatever file format it came from. `answer` indexes `choices`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    benchmark: str
    subject: str
    question: str
    choices: list[str]
    answer: int
    letters: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _default_letters(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("letters") and isinstance(data.get("choices"), list):
            data = {**data, "letters": list(LETTERS[: len(data["choices"])])}
        return data

    @model_validator(mode="after")
    def _check(self) -> "MCItem":
        if not self.question.strip():
            raise ValueError("empty question")
        if len(self.choices) < 2:
            raise ValueError(f"needs at least 2 choices, got {len(self.choices)}")
        if any(not c.strip() for c in self.choices):
            raise ValueError("empty choice")
        if len({c.strip() for c in self.choices}) != len(self.choices):
            raise ValueError("duplicate choices")
        if len(self.letters) != len(self.choices):
            raise ValueError(f"{len(self.letters)} letters for {len(self.choices)} choices")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} out of range for {len(self.choices)} choices")
        return self

    @property
    def answer_letter(self) -> str:
        return self.letters[self.answer]


class PromptItem(BaseModel):
    """One instruction prompt for pairwise judging."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    category: str
    prompt: str

    @field_validator("prompt", "id", "category")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


INSTRUCTION_LANGS: tuple[str, ...] = ("de", "en")
SPLITS: tuple[str, ...] = ("dev", "test")


class InstructedPrompt(BaseModel):
    """One prompt in one language with its verifiable instructions ({"type": ..., **args}, 1 to 3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    instructions: list[dict[str, Any]]

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("instructions")
    @classmethod
    def _valid(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from definemed.eval.instructions import parse

        if not 1 <= len(v) <= 3:
            raise ValueError(f"1 to 3 instructions per prompt, got {len(v)}")
        for ins in v:
            parse(ins)  # InstructionError is a ValueError: pydantic reports it against the field
        return v


class InstructionItem(BaseModel):
    """A parallel instruction-following item: the same request and the same instruction types in German and
    English (arguments translated where they are words), and the split it belongs to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    category: str
    split: str
    de: InstructedPrompt
    en: InstructedPrompt

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        if v not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _parallel(self) -> "InstructionItem":
        de = [i["type"] for i in self.de.instructions]
        en = [i["type"] for i in self.en.instructions]
        if de != en:
            raise ValueError(f"de and en must carry the same instruction types in the same order: {de} vs {en}")
        return self

    def in_lang(self, lang: str) -> InstructedPrompt:
        return getattr(self, lang)


__all__ = [
    "FINEWEB2_COLUMNS", "SAMPLE_EXTRA_COLUMNS", "SAMPLE_WEB_COLUMNS", "GOLD_LABELS", "MALFORMED_KINDS",
    "LETTERS", "MCItem", "PromptItem", "InstructedPrompt", "InstructionItem", "INSTRUCTION_LANGS", "SPLITS",
]
