"""Instruction following that a program can check, after IFEval (Zhou et al. 2023, "Instruction-Following
Evaluation for Large Language Models"): every prompt carries 1-3 verifiable instructions, each checked in code.

An instruction is a dict ``{"type": <id>, **args}``; ``check(answer, instruction) -> bool`` is the public API.
Scores, as IFEval's:
- prompt-level accuracy: the share of prompts whose every instruction passes;
- instruction-level accuracy: the share of all instructions that pass;
- strict: the answer as given; loose: the answer also passes if any of IFEval's variants does (first line,
  last line or both removed, markdown `*` removed), so a polite preamble or a bold heading does not fail it.

Words are `definemed.text.words`, sentences `definemed.text.split_sentences`: one definition in the project.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from definemed.config import InputPath, StrictModel
from definemed.eval.generate import GenerationConfig
from definemed.text import split_sentences, word_count

#: The German system prompt of the instruction sets: sent with every German prompt, so that no model's English
#: default system prompt (SmolLM2's chat template adds one when a request has none) asks for English.
SYSTEM_PROMPT_IF_DE = "Du bist ein hilfreicher medizinischer Assistent. Antworte immer auf Deutsch."
DEFAULT_PROMPTS = "definemed/data/sample/src/instruction_prompts.jsonl"


# ---------------------------------------------------------------- argument models (validated before any work)
class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _N(_Args):
    n: int = Field(ge=1)


class _Keyword(_Args):
    keyword: str = Field(min_length=1)


class _Phrase(_Args):
    phrase: str = Field(min_length=1)


class _YesNo(_Args):
    yes: str = Field("Ja", min_length=1)
    no: str = Field("Nein", min_length=1)


class _Keys(_Args):
    keys: list[str] = Field(min_length=1)

    @field_validator("keys")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("keys must be unique")
        return v


# ---------------------------------------------------------------- checkers: one small function per type
_BULLET = re.compile(r"^\s*[*-]\s+\S", re.MULTILINE)  # "* " or "- " list items (not "**bold**", not "---")
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+\S", re.MULTILINE)
_TITLE = re.compile(r"<<[^\n<>]*\S[^\n<>]*>>")
_EDGE_PUNCT = " \t\n\"'„“”»«.!?:;"


def _max_words(a: str, x: _N) -> bool:
    return word_count(a) <= x.n


def _min_words(a: str, x: _N) -> bool:
    return word_count(a) >= x.n


def _max_sentences(a: str, x: _N) -> bool:
    return len(split_sentences(a)) <= x.n


def _bullets(a: str, x: _N) -> bool:
    return len(_BULLET.findall(a)) == x.n


def _numbered_steps(a: str, x: _N) -> bool:
    """Exactly n numbered lines, numbered 1..n in order."""
    return [int(m) for m in _NUMBERED.findall(a)] == list(range(1, x.n + 1))


def _yes_no(a: str, x: _YesNo) -> bool:
    return a.strip(_EDGE_PUNCT).casefold() in {x.yes.casefold(), x.no.casefold()}


def _json_keys(a: str, x: _Keys) -> bool:
    """The answer parses as one JSON object with exactly these keys (a ``` / ```json fence around it is fine, as in
    IFEval's json_format)."""
    body = a.strip()
    fence = re.fullmatch(r"```(?:json|JSON|Json)?\s*\n?(.*?)\n?```", body, flags=re.DOTALL)
    if fence:
        body = fence.group(1).strip()
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == set(x.keys)


def _include_keyword(a: str, x: _Keyword) -> bool:
    # case-insensitive substring: German compounds count ("Metformin" in "Metformintherapie")
    return x.keyword.casefold() in a.casefold()


def _exclude_keyword(a: str, x: _Keyword) -> bool:
    return not _include_keyword(a, x)


def _start_with(a: str, x: _Phrase) -> bool:
    return a.lstrip().casefold().startswith(x.phrase.casefold())


def _end_with(a: str, x: _Phrase) -> bool:
    return a.rstrip().casefold().endswith(x.phrase.casefold())


def _no_comma(a: str, x: _Args) -> bool:
    return "," not in a


def _title(a: str, x: _Args) -> bool:
    return bool(_TITLE.search(a))


def _lowercase(a: str, x: _Args) -> bool:
    return any(c.isalpha() for c in a) and not any(c.isupper() for c in a)


@dataclass(frozen=True)
class InstructionType:
    id: str
    args: type[_Args]
    check: Callable[[str, Any], bool]
    description: str


#: Every instruction type, by id. Adding one: an args model, a checker, a row here, and a passing and a failing
#: hand-written answer in tests/test_eval_instructions.py.
TYPES: dict[str, InstructionType] = {t.id: t for t in [
    InstructionType("max_words", _N, _max_words, "at most n words"),
    InstructionType("min_words", _N, _min_words, "at least n words"),
    InstructionType("max_sentences", _N, _max_sentences, "at most n sentences (list items and lines count)"),
    InstructionType("bullets", _N, _bullets, "exactly n bullet points ('* ' or '- ' lines)"),
    InstructionType("numbered_steps", _N, _numbered_steps, "exactly n numbered steps, 1. to n."),
    InstructionType("yes_no", _YesNo, _yes_no, "the whole answer is 'Ja' or 'Nein' (or the given words)"),
    InstructionType("json_keys", _Keys, _json_keys, "a JSON object with exactly these keys"),
    InstructionType("include_keyword", _Keyword, _include_keyword, "mentions the keyword"),
    InstructionType("exclude_keyword", _Keyword, _exclude_keyword, "never mentions the keyword"),
    InstructionType("start_with", _Phrase, _start_with, "starts with the phrase"),
    InstructionType("end_with", _Phrase, _end_with, "ends with the phrase"),
    InstructionType("no_comma", _Args, _no_comma, "no comma anywhere"),
    InstructionType("title", _Args, _title, "a title in <<double angle brackets>>"),
    InstructionType("lowercase", _Args, _lowercase, "lower case letters only"),
]}


class InstructionError(ValueError):
    """An instruction that is not one of TYPES or whose arguments do not fit it (one line)."""


def parse(instruction: Mapping[str, Any]) -> tuple[InstructionType, _Args]:
    """The type and validated arguments of an instruction dict; InstructionError if either is wrong."""
    if not isinstance(instruction, Mapping) or "type" not in instruction:
        raise InstructionError(f"an instruction is a dict with a 'type', got {instruction!r}")
    kind = instruction["type"]
    if kind not in TYPES:
        raise InstructionError(f"unknown instruction type {kind!r}: choose one of {', '.join(sorted(TYPES))}")
    t = TYPES[kind]
    try:
        args = t.args.model_validate({k: v for k, v in instruction.items() if k != "type"})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        raise InstructionError(f"instruction {kind!r}: {where}: {err['msg']}") from None
    return t, args


def check(answer: str, instruction: Mapping[str, Any]) -> bool:
    """Whether `answer` follows `instruction` ({"type": ..., **args}), strictly (the answer as given)."""
    t, args = parse(instruction)
    return bool(t.check(answer or "", args))


def loose_variants(answer: str) -> list[str]:
    """IFEval's loose variants: the answer with its first line, its last line or both removed, each with and
    without markdown asterisks."""
    lines = (answer or "").split("\n")
    cuts = ["\n".join(lines), "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
            "\n".join(lines[1:-1]).strip()]
    return [v for c in cuts for v in (c, c.replace("*", ""))]


def check_loose(answer: str, instruction: Mapping[str, Any]) -> bool:
    t, args = parse(instruction)
    return any(v.strip() and t.check(v, args) for v in loose_variants(answer))


# ---------------------------------------------------------------- eval config
class InstructionSetConfig(StrictModel):
    """One language side of the parallel items, asked as its own set."""

    lang: Literal["de", "en"]
    system_prompt: str | None = Field(None, description="system message sent with every prompt of this set; "
                                      "None sends none, and the model's chat template applies its own default "
                                      "(SmolLM2's is English)")


class InstructionGeneration(GenerationConfig):
    """Sampling of the instruction sets; the system prompt is each set's, never one for all."""

    system_prompt: None = Field(None, description="set per set: `sets.<name>.system_prompt`")
    max_tokens: int = Field(192, ge=1)


class InstructionsConfig(StrictModel):
    """Instruction following (IFEval-style) on the parallel German/English prompts: answered through each
    model's OpenAI chat route (its own template, greedy), checked in code, gated on German for German."""

    prompts: InputPath = Field(DEFAULT_PROMPTS, description="JSONL of parallel items (id, category, split, de, en)")
    splits: list[Literal["dev", "test"]] | None = Field(None, description="items of these splits (default all)")
    limit: int | None = Field(None, ge=1, description="first N items (quick runs)")
    sets: dict[str, InstructionSetConfig] = Field(
        default_factory=lambda: {"de": InstructionSetConfig(lang="de", system_prompt=SYSTEM_PROMPT_IF_DE),
                                 "en": InstructionSetConfig(lang="en")},
        min_length=1, description="name -> language side and system prompt")
    models: list[str] | None = Field(None, description="models to ask (default: every model)")
    generation: InstructionGeneration = Field(
        default_factory=InstructionGeneration,
        description="sampling for every answer: greedy (temperature 0) and a fixed max_tokens; the system "
                    "prompt is each set's")

    def generation_for(self, set_name: str | None) -> GenerationConfig:
        """The sampling of one set, with its system prompt (None: no system message)."""
        system = self.sets[set_name].system_prompt if set_name is not None else None
        return GenerationConfig(**{**self.generation.model_dump(), "system_prompt": system})


# ---------------------------------------------------------------- scoring a set of answers
@dataclass(frozen=True)
class PromptResult:
    prompt_id: str
    strict: tuple[bool, ...]  # one per instruction
    loose: tuple[bool, ...]
    language_pass: bool | None = None  # LCB line-level pass of the answer in the set's language
    language_skipped: bool | None = None  # no line of 5 words: LPR leaves the answer out

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)

    @property
    def gated(self) -> bool | None:
        """Language-gated prompt-level accuracy (as Sakana's language-gated score): the instructions pass
        strictly AND the answer is in the requested language."""
        return None if self.language_pass is None else self.prompt_strict and self.language_pass


def score_answer(prompt_id: str, answer: str, instructions: Sequence[Mapping[str, Any]],
                 lang: str | None = None) -> PromptResult:
    from definemed.eval.language import analyze

    a = None if lang is None else analyze(answer, lang)
    return PromptResult(prompt_id, tuple(check(answer, i) for i in instructions),
                        tuple(check_loose(answer, i) for i in instructions),
                        None if a is None else a.passed, None if a is None else a.skipped)


def accuracies(results: Iterable[PromptResult], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Prompt- and instruction-level accuracy, strict and loose, and the language-gated score, each with a 95%
    bootstrap CI over prompts (instruction-level: all instructions of a resampled prompt go together)."""
    import numpy as np

    from definemed.eval.stats import bootstrap_ci, mean_ci

    rs = list(results)
    out: dict[str, dict] = {}
    for mode in ("strict", "loose"):
        out[f"prompt_{mode}"] = mean_ci([float(getattr(r, f"prompt_{mode}")) for r in rs], n_boot=n_boot,
                                        seed=seed).as_dict()
        counts = np.array([[sum(getattr(r, mode)), len(getattr(r, mode))] for r in rs], dtype=float).reshape(-1, 2)
        out[f"instruction_{mode}"] = bootstrap_ci(counts, stat=lambda x: x[:, 0].sum() / x[:, 1].sum(),
                                                  n_boot=n_boot, seed=seed).as_dict()
    gated = [r.gated for r in rs if r.gated is not None]
    if gated:
        out["gated"] = mean_ci([float(g) for g in gated], n_boot=n_boot, seed=seed).as_dict()
    return out


def per_type(results: Sequence[PromptResult], instructions: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
    """Strict pass rate per instruction type: {type: {"n", "passed"}} (where a model fails, by kind)."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        for ins, ok in zip(instructions[r.prompt_id], r.strict):
            d = out.setdefault(ins["type"], {"n": 0, "passed": 0})
            d["n"] += 1
            d["passed"] += int(ok)
    return dict(sorted(out.items()))


def types_used(items: Iterable[Sequence[Mapping[str, Any]]]) -> set[str]:
    return set(itertools.chain.from_iterable((i["type"] for i in ins) for ins in items))


def score_set(items: Sequence[Any], answers: Mapping[str, Mapping[str, Any]], lang: str, n_boot: int = 1000,
              seed: int = 0, tokenizer=None) -> dict[str, Any]:
    """Everything one model's answers to one language side show: the four IFEval accuracies and the
    language-gated one, per instruction type, language confusion (LPR, word level) and answer length.

    `items` are InstructionItems; `answers` maps item id -> record with "answer", "finish_reason" and "usage"
    (completion_tokens), as generation caches them."""
    from definemed.eval import language
    from definemed.eval.stats import mean_ci

    texts = [answers[it.id]["answer"] for it in items]
    results = [score_answer(it.id, a, it.in_lang(lang).instructions, lang=lang) for it, a in zip(items, texts)]
    tokens = [((answers[it.id].get("usage") or {}).get("completion_tokens")) for it in items]
    if any(t is None for t in tokens) and tokenizer is not None:
        tokens = [len(tokenizer.encode(a, add_special_tokens=False)) for a in texts]
    lang_summary = language.summarize(texts, lang, n_boot=n_boot, seed=seed)
    return {
        "lang": lang, "n": len(items),
        **accuracies(results, n_boot=n_boot, seed=seed),
        "per_type": per_type(results, {it.id: it.in_lang(lang).instructions for it in items}),
        "lpr": lang_summary["lpr"], "word_confusion": lang_summary["word_confusion"],
        "language_skipped": lang_summary["skipped"], "language_failed": lang_summary["failed"],
        "tokens": (mean_ci([float(t) for t in tokens], n_boot=n_boot, seed=seed).as_dict()
                   if tokens and all(t is not None for t in tokens) else None),
        "words": mean_ci([float(word_count(a)) for a in texts], n_boot=n_boot, seed=seed).as_dict(),
        "truncated": sum(answers[it.id].get("finish_reason") == "length" for it in items),
        "prompts": [{"id": r.prompt_id, "strict": list(r.strict), "loose": list(r.loose),
                     "language_pass": r.language_pass, "language_skipped": r.language_skipped} for r in results],
    }
