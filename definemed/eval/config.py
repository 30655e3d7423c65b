"""The `eval` stage config: which models, which benchmarks and prompts, how they are served and judged.

A model is reached through an OpenAI-compatible `endpoint` (any server), or, when it has only a `path`,
hosted for the run by our serve app (`serve.launch`). MC scoring needs the weights (`path`): it runs the vLLM
engine (or transformers) locally, because letter log-likelihoods come from prompt logprobs.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from definemed.config import InputPath, StageConfig, StrictModel
from definemed.data.loaders import MCSourceConfig
from definemed.engine import EngineConfig
from definemed.eval.client import EndpointConfig
from definemed.eval.generate import GenerationConfig
from definemed.eval.judge import JudgeConfig
from definemed.eval.frontier import FrontierConfig
from definemed.eval.instructions import InstructionsConfig
from definemed.eval.mc import MCPromptConfig, MCScoringConfig
from definemed.eval.perplexity import PerplexityConfig
from definemed.eval.qa import QAConfig
from definemed.eval.retention import RetentionConfig
from definemed.models.registry import ModelRef

_NAME = r"^[A-Za-z0-9._\-]+$"


class EvalModel(StrictModel):
    """One evaluated model: its weights (`path`, any model reference) and/or a running endpoint."""

    path: ModelRef | None = Field(None, description="tiny://name, real://name, a hub id or a model dir; needed for MC "
                                                     "scoring and for hosting with the serve app")
    endpoint: EndpointConfig | None = Field(None, description="an already running OpenAI-compatible endpoint; "
                                                              "default: host `path` with our serve app")
    engine: EngineConfig = EngineConfig()
    tokenizer: str | None = Field(None, description="tokenizer for token counts (default: path)")

    @model_validator(mode="after")
    def _reachable(self) -> "EvalModel":
        if self.path is None and self.endpoint is None:
            raise ValueError("give `path` (hosted by the serve app) or `endpoint` (an OpenAI-compatible server)")
        return self


class MCConfig(StrictModel):
    sources: list[MCSourceConfig] = Field(min_length=1)
    models: list[str] | None = Field(None, description="models to score (default: every model with a path)")
    prompt: MCPromptConfig = MCPromptConfig()
    scoring: MCScoringConfig = MCScoringConfig()


class PairwiseConfig(StrictModel):
    prompts: InputPath = Field(description="JSONL with id, category, prompt (the clinical prompts)")
    categories: list[str] | None = None
    limit: int | None = Field(None, ge=1, description="first N prompts (quick runs)")
    pairs: list[tuple[str, str]] = Field(min_length=1, description="(candidate, opponent) pairs; each is "
                                                                   "judged in both orders on every prompt")
    generation: GenerationConfig = GenerationConfig()
    judge: JudgeConfig = JudgeConfig()
    length_unit: Literal["words"] = "words"


class FailureModesConfig(StrictModel):
    languages: list[str] = ["GERMAN", "ENGLISH", "FRENCH", "SPANISH", "ITALIAN", "DUTCH", "POLISH",
                            "PORTUGUESE", "TURKISH", "RUSSIAN", "CHINESE"]
    min_words: int = Field(4, ge=1)
    min_confidence: float = Field(0.5, ge=0, le=1)
    dictionary: str = "de_DE"
    allowlist_paths: list[InputPath] = []


class HostingConfig(StrictModel):
    """How models given only by `path` are served for the run (our serve app, on a free loopback port)."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    ready_timeout_s: float = Field(900, gt=0)
    serve: dict[str, Any] = Field(default_factory=dict, description="further ServeConfig fields (limits, ...)")


class ReportConfig(StrictModel):
    title: str = "definemed evaluation"
    note: str | None = Field(None, description="a paragraph under the title: what these models can and cannot "
                                               "show")
    n_boot: int = Field(1000, ge=50)
    seed: int = 0
    plots: bool = True
    html: bool = True
    meaningless: bool | None = Field(None, description="state that the numbers carry no meaning; None = "
                                                       "detect tiny random models")


class EvalConfig(StageConfig):
    models: dict[str, EvalModel] = Field(min_length=1, description="name -> model (e.g. base, cpt, merged, "
                                                                  "reference)")
    judge: EvalModel | None = None
    mc: MCConfig | None = None
    pairwise: PairwiseConfig | None = None
    perplexity: PerplexityConfig | None = None
    frontier: FrontierConfig | None = None
    instructions: InstructionsConfig | None = None
    qa: QAConfig | None = Field(None, description="German extractive QA (SQuAD-style EM/F1), zero- and one-shot, "
                                                  "through each model's chat route")
    retention: RetentionConfig | None = Field(None, description="student ÷ teacher on every metric of the run, "
                                                                "parameter counts, KD vs its CE-only control")
    failure_modes: FailureModesConfig | None = FailureModesConfig()
    hosting: HostingConfig = HostingConfig()
    report: ReportConfig = ReportConfig()
    parallel_models: int = Field(2, ge=1, description="models scored at once for MC and perplexity, each in its "
                                 "own Ray task with its own engine, placed as resources allow: on CPU two "
                                 "overlap their start-up; on a GPU cluster, as many as have free GPUs")

    @model_validator(mode="after")
    def _consistent(self) -> "EvalConfig":
        import re

        for name in self.models:
            if not re.match(_NAME, name) or name == "judge":
                raise ValueError(f"model name {name!r}: use letters, digits, '.', '_', '-' (and not 'judge')")
        if (self.mc is None and self.pairwise is None and self.perplexity is None and self.instructions is None
                and self.qa is None):
            raise ValueError("mc, pairwise, perplexity, instructions, qa: nothing to evaluate, configure at least one")
        for section in ("instructions", "qa"):
            for m in getattr(getattr(self, section), "models", None) or []:
                if m not in self.models:
                    raise ValueError(f"{section}.models: unknown model {m!r} (known: {', '.join(self.models)})")
        self._check_perplexity()
        self._check_chat_templates()
        if self.mc is not None:
            for m in self.mc.models or []:
                if m not in self.models:
                    raise ValueError(f"mc.models: unknown model {m!r} (known: {', '.join(self.models)})")
            for m in self.mc.models or [n for n, r in self.models.items() if r.path]:
                if self.models[m].path is None:
                    raise ValueError(f"mc.models: {m!r} has no `path`; MC scoring needs the weights")
        self._check_retention()
        if self.pairwise is not None:
            if self.judge is None:
                raise ValueError("judge: required when `pairwise` is configured")
            for a, b in self.pairwise.pairs:
                for m in (a, b):
                    if m not in self.models:
                        raise ValueError(f"pairwise.pairs: unknown model {m!r} (known: {', '.join(self.models)})")
                if a == b:
                    raise ValueError(f"pairwise.pairs: a model cannot be compared with itself ({a!r})")
        return self

    def _check_perplexity(self) -> None:
        if self.perplexity is not None:
            for m in self.perplexity.models or []:
                if m not in self.models or self.models[m].path is None:
                    raise ValueError(f"perplexity.models: {m!r} is not a model with a `path` (perplexity needs "
                                     "the weights)")
        if self.frontier is not None:
            if self.perplexity is None:
                raise ValueError("frontier: needs the `perplexity` section (its points are scored on its sets)")
            for field, m in [("model_a", self.frontier.model_a), ("model_b", self.frontier.model_b),
                             *[("marked", x) for x in self.frontier.marked]]:
                if m not in self.perplexity_models():
                    raise ValueError(f"frontier.{field}: {m!r} is not among the perplexity models "
                                     f"({', '.join(self.perplexity_models())})")

    def _check_retention(self) -> None:
        """Every retention model is a known model and is scored by every metric section of the run (a missing
        score would leave its retention silently empty)."""
        r = self.retention
        if r is None:
            return
        fields = [("teacher", r.teacher), *[("students", m) for m in r.students]]
        if r.control is not None:
            fields += [("control.kd", r.control.kd), ("control.ce", r.control.ce)]
        for field, m in fields:
            if m not in self.models:
                raise ValueError(f"retention.{field}: unknown model {m!r} (known: {', '.join(self.models)})")
        scored = {"perplexity": self.perplexity_models() if self.perplexity else None,
                  "instructions": self.instruction_models() if self.instructions else None,
                  "mc": self.mc_models() if self.mc else None, "qa": self.qa_models() if self.qa else None}
        if not any(v is not None for v in scored.values()):
            raise ValueError("retention: needs a metric section (perplexity, instructions, mc or qa)")
        for field, m in fields:
            for section, models in scored.items():
                if models is not None and m not in models:
                    raise ValueError(f"retention.{field}: {m!r} is not scored by `{section}` "
                                     f"({section}.models: {', '.join(models)})")
        if r.control is not None and self.perplexity is None and self.qa is None:
            raise ValueError("retention.control: KD vs CE-only compares perplexity and QA F1; configure "
                             "`perplexity` or `qa`")
        if self.perplexity is not None and r.perplexity_set not in self.perplexity.sets:
            raise ValueError(f"retention.perplexity_set: {r.perplexity_set!r} is not a perplexity set "
                             f"({', '.join(self.perplexity.sets)})")
        if self.perplexity is not None and r.backend and r.backend not in self.perplexity.backends:
            raise ValueError(f"retention.backend: {r.backend!r} is not among perplexity.backends "
                             f"({', '.join(self.perplexity.backends)})")

    def _check_chat_templates(self) -> None:
        """Chat needs a template: a model answering clinical prompts or judging, or MC with chat prompts."""
        from definemed.models.registry import has_chat_template

        chat: dict[str, str] = {}
        if self.pairwise is not None:
            in_pairs = {m for pair in self.pairwise.pairs for m in pair}
            for m in (self.models if self.failure_modes is not None else in_pairs):
                chat[m] = f"models.{m}"
            chat["judge"] = "judge"
        if self.mc is not None and self.mc.prompt.chat_template:
            for m in self.mc_models():
                chat.setdefault(m, f"models.{m}")
        for m in self.instruction_models() + self.qa_models():
            chat.setdefault(m, f"models.{m}")
        for name, field in chat.items():
            ref = self.judge if name == "judge" else self.models[name]
            if ref is not None and ref.endpoint is None and ref.path and has_chat_template(ref.path) is False:
                raise ValueError(f"{field}.path: {ref.path} has no chat template, but this evaluation chats with "
                                 "it (pairwise answers, judging, chat-format MC, instructions or QA)")

    def perplexity_models(self) -> list[str]:
        if self.perplexity is None:
            return []
        return self.perplexity.models or [n for n, r in self.models.items() if r.path]

    def instruction_models(self) -> list[str]:
        if self.instructions is None:
            return []
        return self.instructions.models or list(self.models)

    def qa_models(self) -> list[str]:
        if self.qa is None:
            return []
        return self.qa.models or list(self.models)

    def mc_models(self) -> list[str]:
        if self.mc is None:
            return []
        return self.mc.models or [n for n, r in self.models.items() if r.path]

    def lineage_inputs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, ref in self.models.items():
            if ref.path:
                out[f"model.{name}"] = ref.path
        if self.judge is not None and self.judge.path:
            out["model.judge"] = self.judge.path
        if self.mc is not None:
            for i, s in enumerate(self.mc.sources):
                out[f"mc.{s.benchmark or i}"] = s.path
        if self.pairwise is not None:
            out["prompts"] = self.pairwise.prompts
        if self.instructions is not None:
            out["instruction_prompts"] = self.instructions.prompts
        if self.qa is not None:
            out["qa_items"] = self.qa.path
        if self.perplexity is not None:
            for name, st in self.perplexity.sets.items():
                out[f"perplexity.{name}"] = st.path
        return out
