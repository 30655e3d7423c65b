"""Multiple-choice benchmarks (MMLU-de, MedQA-de): German zero-/few-shot prompts, letter scoring, accuracy.

Scoring (the default, `loglik`): the log-likelihood of each answer letter after the prompt, i.e. of the tokens
of " A", " B", ... appended to "Antwort:". The letter tokens are appended as token ids (not re-tokenised text),
so exactly those tokens are scored. Backends: vLLM prompt logprobs (`SamplingParams(max_tokens=1,
prompt_logprobs=0)` returns the logprob of every prompt token) or one transformers forward pass. The argmax
over letters is the prediction: one valid letter per item, always. `generate` mode lets the model write and
parses the first answer letter; answers without a letter count as `unparsed` (and wrong).
"""
from __future__ import annotations

import logging
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

import numpy as np
from pydantic import Field

from definemed.config import StrictModel
from definemed.data.schemas import MCItem
from definemed.eval.stats import Estimate, mean_ci

log = logging.getLogger(__name__)

SUBJECTS_DE = {
    "anatomy": "Anatomie",
    "clinical_knowledge": "klinisches Wissen",
    "college_medicine": "Medizin (Studium)",
    "medical_genetics": "medizinische Genetik",
    "professional_medicine": "Medizin (Facharztniveau)",
    "college_biology": "Biologie (Studium)",
    "nutrition": "Ernährung",
    "virology": "Virologie",
}
HEADER_DE = "Die folgenden Fragen sind Multiple-Choice-Fragen (mit Antworten) zum Thema {topic}."
HEADER_MEDQA_DE = "Die folgenden Fragen sind Multiple-Choice-Fragen (mit Antworten) aus medizinischen Prüfungen."
INSTRUCTION_GEN_DE = "Antworte nur mit dem Buchstaben der richtigen Antwort."


class MCPromptConfig(StrictModel):
    shots: int = Field(0, ge=0, description="few-shot examples from the same benchmark and subject (never the item)")
    seed: int = 0
    chat_template: bool = Field(False, description="wrap the question in the model's chat template")


class MCScoringConfig(StrictModel):
    mode: Literal["loglik", "generate"] = "loglik"
    backend: Literal["vllm", "transformers"] = "vllm"
    max_gen_tokens: int = Field(8, ge=1, description="generate mode: tokens the model may write")
    constrained: bool = Field(False, description="generate mode: restrict output to the letters "
                                                 "(vLLM structured outputs)")
    batch_size: int = Field(256, ge=1)


# ---------------------------------------------------------------- prompts
def topic_de(item: MCItem) -> str:
    return SUBJECTS_DE.get(item.subject, item.subject.replace("_", " "))


def format_item(item: MCItem, with_answer: bool) -> str:
    lines = [f"Frage: {item.question.strip()}"]
    lines += [f"{letter}. {choice.strip()}" for letter, choice in zip(item.letters, item.choices)]
    lines.append("Antwort:" + (f" {item.answer_letter}" if with_answer else ""))
    return "\n".join(lines)


def header(item: MCItem) -> str:
    return HEADER_MEDQA_DE if "medqa" in item.benchmark.lower() else HEADER_DE.format(topic=topic_de(item))


def build_prompt(item: MCItem, shots: Sequence[MCItem] = (), generate: bool = False) -> str:
    """German prompt ending in "Antwort:" (the letter follows). Few-shot examples carry their answers."""
    parts = [header(item)]
    if generate:
        parts.append(INSTRUCTION_GEN_DE)
    parts += [format_item(s, with_answer=True) for s in shots]
    parts.append(format_item(item, with_answer=False))
    return "\n\n".join(parts)


def select_shots(items: Sequence[MCItem], k: int, seed: int = 0) -> dict[str, list[MCItem]]:
    """k examples per item from the same benchmark and subject (falling back to the benchmark), never the item
    itself; deterministic given the seed."""
    if k == 0:
        return {it.id: [] for it in items}
    by_subject: dict[tuple[str, str], list[MCItem]] = defaultdict(list)
    by_bench: dict[str, list[MCItem]] = defaultdict(list)
    for it in items:
        by_subject[(it.benchmark, it.subject)].append(it)
        by_bench[it.benchmark].append(it)
    out = {}
    for it in items:
        rng = random.Random(f"{seed}/{it.id}")
        pool = [x for x in by_subject[(it.benchmark, it.subject)] if x.id != it.id]
        if len(pool) < k:
            rest = [x for x in by_bench[it.benchmark] if x.id != it.id and x not in pool]
            pool = pool + rng.sample(rest, min(k - len(pool), len(rest)))
        out[it.id] = rng.sample(pool, min(k, len(pool)))
    return out


# ---------------------------------------------------------------- scoring backends
class LetterScorer(Protocol):
    def letter_logprobs(self, prompts: Sequence[str], letters: Sequence[Sequence[str]]) -> list[list[float]]: ...


def _render(tokenizer, text: str, chat_template: bool) -> list[int]:
    if chat_template and getattr(tokenizer, "chat_template", None):
        body, _, tail = text.rpartition("Antwort:")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": body.rstrip()}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer.encode(rendered + "Antwort:", add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=True)


def letter_ids(tokenizer, letter: str) -> list[int]:
    ids = tokenizer.encode(" " + letter, add_special_tokens=False)
    if not ids:
        raise ValueError(f"tokenizer maps letter {letter!r} to no tokens")
    return ids


def _fit(prompt_ids: list[int], cont: list[int], max_len: int) -> tuple[list[int], bool]:
    """Keep the end of the prompt (the question) when prompt + letter exceed the context."""
    room = max_len - len(cont) - 1  # vLLM also needs a slot for the one generated token
    if len(prompt_ids) <= room:
        return prompt_ids, False
    return prompt_ids[-room:], True


@dataclass
class VllmScorer:
    """Letter log-likelihoods from vLLM prompt logprobs (any vllm.LLM: CPU build here, CUDA on a cluster)."""

    llm: Any
    chat_template: bool = False
    batch_size: int = 256
    truncated: int = 0

    def letter_logprobs(self, prompts: Sequence[str], letters: Sequence[Sequence[str]]) -> list[list[float]]:
        from vllm import SamplingParams

        tok = self.llm.get_tokenizer()
        max_len = self.llm.llm_engine.model_config.max_model_len
        reqs, index = [], []
        for i, (p, ls) in enumerate(zip(prompts, letters)):
            base = _render(tok, p, self.chat_template)
            for j, letter in enumerate(ls):
                cont = letter_ids(tok, letter)
                ids, cut = _fit(base, cont, max_len)
                self.truncated += int(cut and j == 0)
                reqs.append({"prompt_token_ids": ids + cont})
                index.append((i, j, len(cont)))
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out: list[list[float]] = [[math.nan] * len(ls) for ls in letters]
        for start in range(0, len(reqs), self.batch_size):
            chunk = reqs[start:start + self.batch_size]
            results = self.llm.generate(chunk, sp, use_tqdm=False)
            for req, res, (i, j, n_cont) in zip(chunk, results, index[start:start + self.batch_size]):
                ids = req["prompt_token_ids"]
                plp = res.prompt_logprobs
                total = 0.0
                for pos in range(len(ids) - n_cont, len(ids)):
                    total += plp[pos][ids[pos]].logprob
                out[i][j] = total
        return out


@dataclass
class TransformersScorer:
    """Letter log-likelihoods from a transformers forward pass (no vLLM needed; slower for big models)."""

    model: Any
    tokenizer: Any
    chat_template: bool = False
    max_len: int = 4096
    truncated: int = 0

    @classmethod
    def from_path(cls, path: str, chat_template: bool = False, max_len: int = 4096) -> "TransformersScorer":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        return cls(model, tok, chat_template, max_len)

    def letter_logprobs(self, prompts: Sequence[str], letters: Sequence[Sequence[str]]) -> list[list[float]]:
        import torch

        out = []
        for p, ls in zip(prompts, letters):
            base = _render(self.tokenizer, p, self.chat_template)
            conts = [letter_ids(self.tokenizer, letter) for letter in ls]
            row = []
            with torch.no_grad():
                if all(len(c) == 1 for c in conts):  # one pass: next-token distribution after the prompt
                    ids, cut = _fit(base, conts[0], self.max_len)
                    self.truncated += int(cut)
                    # only the last position's logits: the vocabulary head is most of a small model's FLOPs
                    logits = self.model(torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1].float()
                    lp = torch.log_softmax(logits, -1)
                    row = [float(lp[c[0]]) for c in conts]
                else:
                    for c in conts:
                        ids, cut = _fit(base, c, self.max_len)
                        full = torch.tensor([ids + c])
                        lp = torch.log_softmax(self.model(full, use_cache=False).logits[0].float(), -1)
                        row.append(float(sum(lp[len(ids) - 1 + k, t] for k, t in enumerate(c))))
            out.append(row)
        return out


# ---------------------------------------------------------------- generate-and-parse
def parse_letter(text: str, letters: Sequence[str]) -> str | None:
    """First answer letter the model wrote ("C", "C.", "(C)", "Antwort: C"), or None."""
    allowed = "".join(letters)
    m = re.search(rf"(?<![A-Za-zÄÖÜäöü])([{allowed}])(?![A-Za-zÄÖÜäöü])", text or "")
    return m.group(1) if m else None


def generate_letters(llm, prompts: Sequence[str], letters: Sequence[Sequence[str]], max_tokens: int = 8,
                     constrained: bool = False, chat_template: bool = False) -> list[tuple[str, str | None]]:
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    max_len = llm.llm_engine.model_config.max_model_len
    reqs, params = [], []
    for p, ls in zip(prompts, letters):
        ids, _ = _fit(_render(tok, p, chat_template), [0] * max_tokens, max_len)
        reqs.append({"prompt_token_ids": ids})
        kw: dict[str, Any] = dict(max_tokens=max_tokens, temperature=0.0)
        if constrained:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(choice=[f" {x}" for x in ls])
        params.append(SamplingParams(**kw))
    results = llm.generate(reqs, params, use_tqdm=False)
    return [(r.outputs[0].text, parse_letter(r.outputs[0].text, ls)) for r, ls in zip(results, letters)]


# ---------------------------------------------------------------- evaluation
@dataclass
class MCPrediction:
    model: str
    item_id: str
    benchmark: str
    subject: str
    answer: str
    prediction: str | None  # None only in generate mode when no letter could be parsed
    correct: bool
    logprobs: list[float] = field(default_factory=list)
    raw: str | None = None
    n_options: int = 0  # 0 in predictions written before it was recorded; loglik ones still have len(logprobs)


def predict(model_name: str, items: Sequence[MCItem], prompts: Sequence[str], scoring: MCScoringConfig,
            scorer: LetterScorer | None = None, llm: Any = None, chat_template: bool = False) -> list[MCPrediction]:
    letters = [it.letters for it in items]
    preds = []
    if scoring.mode == "loglik":
        assert scorer is not None
        lps = scorer.letter_logprobs(prompts, letters)
        for it, lp in zip(items, lps):
            if len(lp) != len(it.letters) or any(math.isnan(x) for x in lp):
                raise RuntimeError(f"{model_name}: no score for every letter of item {it.id}")
            pred = it.letters[int(np.argmax(lp))]
            preds.append(MCPrediction(model_name, it.id, it.benchmark, it.subject, it.answer_letter, pred,
                                      pred == it.answer_letter, list(lp), n_options=len(it.letters)))
    else:
        assert llm is not None
        gens = generate_letters(llm, prompts, letters, scoring.max_gen_tokens, scoring.constrained, chat_template)
        for it, (raw, pred) in zip(items, gens):
            preds.append(MCPrediction(model_name, it.id, it.benchmark, it.subject, it.answer_letter, pred,
                                      pred == it.answer_letter, [], raw, n_options=len(it.letters)))
    return preds


def build_prompts(items: Sequence[MCItem], cfg: MCPromptConfig, generate: bool = False) -> list[str]:
    shots = select_shots(items, cfg.shots, cfg.seed)
    return [build_prompt(it, shots[it.id], generate=generate) for it in items]


def accuracy_table(preds: Sequence[MCPrediction], n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Rows (benchmark, subject | "overall", model) with accuracy, its bootstrap CI and the chance level
    (mean of 1 / options over the items; None when the option counts are unknown)."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    unparsed: dict[tuple[str, str, str], int] = defaultdict(int)
    chance: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for p in preds:
        n_opt = p.n_options or len(p.logprobs)
        for subj in (p.subject, "overall"):
            key = (p.benchmark, subj, p.model)
            groups[key].append(1.0 if p.correct else 0.0)
            unparsed[key] += int(p.prediction is None)
            if n_opt:
                chance[key].append(1.0 / n_opt)
    rows = []
    for (bench, subj, model), vals in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] == "overall",
                                                                             kv[0][1], kv[0][2])):
        est: Estimate = mean_ci(vals, n_boot=n_boot, seed=seed)
        odds = chance[(bench, subj, model)]
        rows.append({"benchmark": bench, "subject": subj, "model": model, "n": est.n, "accuracy": est.value,
                     "lo": est.lo, "hi": est.hi, "unparsed": unparsed[(bench, subj, model)],
                     "chance": sum(odds) / len(odds) if len(odds) == len(vals) else None})
    return rows
