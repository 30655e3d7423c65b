"""Config of the `merge-search` stage: the two parents, the search space, the objectives with their directions,
the dev and test data, and how many trials run side by side.

Validated before any work: an unknown method, a knot range outside [0, 1] or an unknown objective is one line
naming the field (exit 2).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from definemed.config import InputPath, StageConfig, StrictModel
from definemed.engine import EngineConfig
from definemed.eval.instructions import DEFAULT_PROMPTS, SYSTEM_PROMPT_IF_DE
from definemed.eval.perplexity import PerplexitySetConfig
from definemed.merge.config import MergeResources
from definemed.models.registry import ModelRef

METHODS = ("slerp", "linear", "ties", "dare_ties")
#: Objectives a trial reports, with the direction that is better. Perplexities on the dev documents; instruction
#: following on the dev prompts (English: prompt-level strict; German: language-gated); LPR of the German answers;
#: mean answer tokens over both sets.
METRICS: dict[str, Literal["min", "max"]] = {
    "ppl_medical": "min", "ppl_general": "min", "if_en": "max", "if_de_gated": "max", "lpr_de": "max",
    "answer_tokens": "min",
}


class Range(StrictModel):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


def _unit(r: Range, what: str) -> Range:
    if not (0.0 <= r.low and r.high <= 1.0):
        raise ValueError(f"{what} must lie in [0, 1], got [{r.low}, {r.high}]")
    return r


class SearchSpace(StrictModel):
    """What a trial may choose. Knots are the points of a gradient over the layers (mergekit's: layer i of L
    sits at i / (L - 1) and takes the piecewise-linear value there), one gradient for self-attention and one for
    the MLP, plus the `default` t of every other tensor (embeddings, norms)."""

    methods: list[Literal["slerp", "linear", "ties", "dare_ties"]] = Field(
        default_factory=lambda: list(METHODS), min_length=1)
    knots: int = Field(5, ge=1, le=16, description="gradient knots per component (1 = one t for the component)")
    t: Range = Field(default_factory=lambda: Range(low=0.0, high=1.0), description="range of every knot and of "
                     "the default t (for ties/dare_ties/linear it is the task-vector weight)")
    density: Range = Field(default_factory=lambda: Range(low=0.1, high=1.0),
                           description="ties / dare_ties: fraction of the task vector kept")
    granularity: list[Literal["component", "uniform"]] = Field(
        default_factory=lambda: ["component"], min_length=1,
        description="component: knots for self_attn and mlp; uniform: one t for every tensor (searched too when "
                    "listed)")

    @field_validator("t")
    @classmethod
    def _t_unit(cls, v: Range) -> Range:
        return _unit(v, "t")

    @field_validator("density")
    @classmethod
    def _density_unit(cls, v: Range) -> Range:
        if v.low <= 0.0:
            raise ValueError(f"density must be > 0, got low {v.low}")
        return _unit(v, "density")


class Objective(StrictModel):
    metric: str
    mode: Literal["min", "max"] | None = Field(None, description="default: the metric's own direction")

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown objective {v!r}: choose from {', '.join(METRICS)}")
        return v

    @property
    def direction(self) -> Literal["min", "max"]:
        return self.mode or METRICS[self.metric]


class Constraint(StrictModel):
    """A trial counts as infeasible (never on the front) when `metric` exceeds `max_ratio` x model_a's value:
    e.g. answers at most 1.2 x as long as the instruct parent's."""

    metric: Literal["answer_tokens", "ppl_medical", "ppl_general"]
    max_ratio: float = Field(gt=0)


class SplitData(StrictModel):
    """The documents and prompts one split scores on. Documents of a set are divided between dev and test by a
    seeded hash of their id; prompts by the `split` field of the instruction items."""

    documents: int = Field(12, ge=1, description="documents per perplexity set and split (first N by hash)")
    prompts: int = Field(12, ge=1, description="instruction items per split (both languages are asked)")


class ScoringConfig(StrictModel):
    sets: dict[str, PerplexitySetConfig] = Field(min_length=1, description="medical and general document sets")
    split_seed: int = Field(0, description="seed of the document hash that assigns dev / test")
    prompts: InputPath = DEFAULT_PROMPTS
    dev: SplitData = SplitData()
    test: SplitData = Field(default_factory=lambda: SplitData(documents=12, prompts=36))
    ppl_max_tokens: int = Field(256, ge=2, description="tokens per document")
    max_tokens: int = Field(96, ge=1, description="tokens per answer (greedy)")
    system_prompt_de: str | None = Field(SYSTEM_PROMPT_IF_DE, description="as the eval stage's German set")
    system_prompt_en: str | None = Field(None, description="None: the chat template's own default")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(max_model_len=1024))

    @field_validator("sets")
    @classmethod
    def _medical_and_general(cls, v: dict) -> dict:
        missing = {"medical", "general"} - set(v)
        if missing:
            raise ValueError(f"needs the sets 'medical' and 'general' (missing {', '.join(sorted(missing))})")
        return v


class SamplerConfig(StrictModel):
    kind: Literal["nsga2", "motpe"] = "nsga2"
    population_size: int = Field(8, ge=2, description="NSGA-II: trials per generation")
    seed: int = 0


class MergeSearchConfig(StageConfig):
    """`definemed merge-search`: search merge recipes of model_a (the instruct parent, t = 0) and model_b (its
    CPT model, t = 1) for several objectives at once; select the Pareto front on dev, report it on test."""

    model_a: ModelRef
    model_b: ModelRef
    space: SearchSpace = SearchSpace()
    objectives: list[Objective] = Field(min_length=1)
    constraints: list[Constraint] = []
    trials: int = Field(24, ge=1)
    max_concurrent_trials: int = Field(1, ge=1, description="trials side by side, one engine each")
    resources_per_trial: MergeResources = Field(default_factory=lambda: MergeResources(num_cpus=2),
                                                description="Ray resources of one trial (its engine and merge)")
    sampler: SamplerConfig = SamplerConfig()
    rescore_top: int = Field(8, ge=1, description="front members re-scored on test, best first (the front can "
                             "hold most trials when there are many objectives)")
    scoring: ScoringConfig
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    @model_validator(mode="after")
    def _distinct(self) -> "MergeSearchConfig":
        names = [o.metric for o in self.objectives]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"objectives: {dup[0]!r} is listed twice")
        return self

    def lineage_inputs(self) -> dict[str, str]:
        out = {"model_a": self.model_a, "model_b": self.model_b, "prompts": self.scoring.prompts}
        out.update({f"documents.{n}": s.path for n, s in self.scoring.sets.items()})
        return out
