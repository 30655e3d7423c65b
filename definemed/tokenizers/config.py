"""Config of the `tokenizers` stage: which tokenizers, on which sets, where the table goes."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from definemed.config import InputPath, StageConfig, StrictModel


class TokenizerSpec(StrictModel):
    """One tokenizer to measure. `source`: real://<name>, tiny://<name>, mistral_common:<file shipped in the
    package>, mistral:<path to a Mistral tokenizer file>, or a directory holding tokenizer.json. `family` (a key of
    definemed.tokenizers.families.FAMILIES) is required for sources the project does not know, and must agree for
    those it does."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][\w.+-]*$")
    source: str
    family: str | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, v: str, info: ValidationInfo) -> str:
        from definemed.tokenizers.sources import check_source

        ctx = info.context or {}
        # `definemed plan` validates before the cluster's /models volume exists
        return check_source(v, local_paths=not ctx.get("plan_only"))

    @field_validator("family")
    @classmethod
    def _family(cls, v: str | None) -> str | None:
        from definemed.tokenizers.families import check_family

        return None if v is None else check_family(v)

    @model_validator(mode="after")
    def _family_known(self):
        from definemed.tokenizers.sources import known

        k = known(self.source)
        if k is None and self.family is None and not self.source.startswith("tiny://"):
            raise ValueError(f"source {self.source} is not one the project knows: give its family")
        if k is not None and self.family is not None and self.family != k.family:
            raise ValueError(f"{self.source} is family {k.family!r}, not {self.family!r}")
        return self


class DocumentSet(StrictModel):
    """Documents from Parquet (a file, directory or glob, e.g. the filter stage's `finemed_de`), streamed in
    batches. `where` keeps rows whose columns equal the given values (the bundled sample's gold_label)."""

    kind: Literal["documents"] = "documents"
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][\w.+-]*$")
    description: str = Field(min_length=1)
    path: InputPath
    text_column: str = "text"
    where: dict[str, str] = {}
    limit: int | None = Field(default=None, ge=1)


class ParallelSet(StrictModel):
    """Parallel sentences (JSONL with id and one field per language) for parity."""

    kind: Literal["parallel"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][\w.+-]*$")
    description: str = Field(min_length=1)
    path: InputPath
    lang: str = "de"
    reference_lang: str = "en"
    limit: int | None = Field(default=None, ge=1)


def _set_kind(v) -> str:
    return v.get("kind", "documents") if isinstance(v, dict) else getattr(v, "kind", "documents")


TextSet = Annotated[Union[Annotated[DocumentSet, Tag("documents")], Annotated[ParallelSet, Tag("parallel")]],
                    Discriminator(_set_kind)]


class TokenizersConfig(StageConfig):
    """Fertility, split share and parity of every listed tokenizer on every listed set."""

    tokenizers: list[TokenizerSpec] = Field(min_length=1)
    sets: list[TextSet] = Field(min_length=1)
    batch_size: int = Field(256, ge=1)  # texts tokenized per call (HF tokenizers batch in Rust)
    n_boot: int = Field(1000, ge=100)
    ci_sample: int = Field(20000, ge=100)  # items the bootstrap resamples from (a seeded sample of larger sets)
    seed: int = 0

    @field_validator("tokenizers")
    @classmethod
    def _unique_tokenizers(cls, v):
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tokenizer names must be unique: {dup}")
        return v

    @field_validator("sets")
    @classmethod
    def _unique_sets(cls, v):
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"set names must be unique: {dup}")
        return v

    def lineage_inputs(self) -> dict[str, str]:
        from definemed.tokenizers.sources import source_path

        out = super().lineage_inputs()
        out.update({f"tokenizers.{t.name}": source_path(t.source) for t in self.tokenizers})
        return out
