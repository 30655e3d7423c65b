"""Score the model an engine holds on one split: every objective, per item, so that any two models scored on the
same split can be compared pairwise with a bootstrap CI.

Per item means per document for the perplexities (summed NLL and target tokens, so the perplexity is token
weighted as in the eval stage) and per instruction item for the rest:
- if_en: IFEval prompt-level strict accuracy on the English side (what the instruct parent can do);
- if_de_gated: prompt-level strict AND the answer passes LPR, on the German side (language-gated, as Sakana's);
- lpr_de: the German answer's LCB line-level pass (nan when it has no line of 5 words: LPR skips it);
- answer_tokens: mean completion tokens of the item's two answers.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from definemed.merge.search.config import METRICS, ScoringConfig
from definemed.merge.search.data import SplitSet

Items = dict[str, list[list[float]]]  # metric -> one row per item


def generation(cfg: ScoringConfig, lang: str):
    from definemed.eval.generate import GenerationConfig

    system = cfg.system_prompt_de if lang == "de" else cfg.system_prompt_en
    return GenerationConfig(system_prompt=system, max_tokens=cfg.max_tokens, temperature=0.0, seed=0)


def score_engine(llm, split: SplitSet, cfg: ScoringConfig) -> dict[str, Any]:
    """Per-item rows of every metric and the answers, for the weights `llm` holds now."""
    from definemed.eval.generate import chat_records, messages
    from definemed.eval.instructions import score_answer
    from definemed.eval.perplexity import nll_vllm, tokenize_docs

    tok = llm.get_tokenizer()
    items: Items = {}
    for name, docs in split.documents.items():
        ids = tokenize_docs(tok, [t for _, t in docs], cfg.ppl_max_tokens)
        items[f"ppl_{name}"] = [[nll, len(d) - 1] for nll, d in zip(nll_vllm(llm, ids), ids)]
    answers: dict[str, list[dict]] = {}
    for lang in ("en", "de"):
        gen = generation(cfg, lang)
        convs = [messages(gen, it.in_lang(lang).prompt) for it in split.items]
        answers[lang] = chat_records(llm, convs, gen)
    en = [score_answer(it.id, r["answer"], it.en.instructions) for it, r in zip(split.items, answers["en"])]
    from dataclasses import replace

    from definemed.eval.language import analyze

    # one language analysis per German answer serves both the gate and LPR (lingua is the slow part)
    langs = [analyze(r["answer"], "de") for r in answers["de"]]
    de = [replace(score_answer(it.id, r["answer"], it.de.instructions), language_pass=a.passed)
          for it, r, a in zip(split.items, answers["de"], langs)]
    items["if_en"] = [[float(r.prompt_strict)] for r in en]
    items["if_de_gated"] = [[float(bool(r.gated))] for r in de]
    items["lpr_de"] = [[math.nan if a.skipped else float(a.passed)] for a in langs]
    items["answer_tokens"] = [[(e["usage"]["completion_tokens"] + d["usage"]["completion_tokens"]) / 2]
                              for e, d in zip(answers["en"], answers["de"])]
    return {"items": items, "metrics": metrics(items),
            "answers": {lang: [{"id": it.id, "answer": r["answer"], "finish_reason": r["finish_reason"]}
                               for it, r in zip(split.items, recs)] for lang, recs in answers.items()}}


def value(metric: str, rows: np.ndarray) -> float:
    """The metric over item rows: token-weighted perplexity, else the mean of the items that have a value."""
    rows = np.asarray(rows, dtype=float).reshape(len(rows), -1)
    if metric.startswith("ppl_"):
        return float(math.exp(rows[:, 0].sum() / rows[:, 1].sum())) if len(rows) else math.nan
    vals = rows[:, 0][~np.isnan(rows[:, 0])]
    return float(vals.mean()) if len(vals) else math.nan


def metrics(items: Items) -> dict[str, float]:
    return {m: value(m, np.asarray(items[m])) for m in METRICS if m in items}


def estimate(metric: str, rows, n_boot: int = 1000, seed: int = 0) -> dict:
    from definemed.eval.stats import bootstrap_ci

    return bootstrap_ci(np.asarray(rows, dtype=float), stat=lambda x: value(metric, x), n_boot=n_boot,
                        seed=seed).as_dict()


def paired_difference(metric: str, rows_a, rows_b, n_boot: int = 1000, seed: int = 0) -> dict:
    """value(a) - value(b) with a paired percentile bootstrap CI: the same resampled items for both models."""
    from definemed.eval.stats import paired_difference as paired

    return paired(rows_a, rows_b, stat=lambda x: value(metric, x), n_boot=n_boot, seed=seed, what=metric).as_dict()
