"""Held-out perplexity: what CPT optimises, and the one number that shows domain adaptation even for a base model.

Per model and document set, perplexity is token-weighted: exp(sum of token NLLs / number of predicted tokens)
over all documents, each cut to its first `max_tokens` tokens and opened with the tokenizer's own special tokens
(Gemma's <bos>). The first token is never predicted. The CI resamples documents, not tokens (tokens of one
document are not independent). Two backends compute the same NLLs from the same token ids: vLLM prompt logprobs
and a transformers forward pass; the report shows both and whether they agree.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from definemed.config import InputPath, StrictModel
from definemed.eval.stats import Estimate, bootstrap_ci

log = logging.getLogger(__name__)
Backend = Literal["vllm", "transformers"]


class PerplexitySetConfig(StrictModel):
    """A held-out document set: Parquet (file, directory or glob) or JSONL with a text column."""

    path: InputPath
    text_column: str = "text"
    id_column: str = "id"
    where: dict[str, str] = Field(default_factory=dict, description="keep rows whose columns equal these values, "
                                                                    "e.g. {gold_label: non_medical}")
    exclude_trained: str | None = Field(None, description="a pack stage's output_dir: drop the documents it "
                                                          "trained on (so a general set never overlaps CPT data)")
    split: Literal["dev", "test"] | None = Field(None, description="keep one half of the documents by a seeded id "
                                                  "hash (definemed.train.split.dev_test_split): report on `test` "
                                                  "what was selected on `dev` (a merge search, a distillation sweep)")
    split_seed: int = 0
    limit: int | None = Field(None, ge=1, description="first N documents after filtering (sorted by id)")


class PerplexityConfig(StrictModel):
    sets: dict[str, PerplexitySetConfig] = Field(min_length=1, description="name -> set, e.g. medical (the "
                                                                           "pack stage's held-out FineMed-de), "
                                                                           "general (non-medical German)")
    models: list[str] | None = Field(None, description="models to score (default: every model with a path)")
    backends: list[Backend] = Field(default_factory=lambda: ["vllm", "transformers"], min_length=1)
    max_tokens: int = Field(512, ge=2, description="tokens per document (the rest is cut)")
    agreement_tolerance: float = Field(0.01, gt=0, description="relative perplexity difference up to which the "
                                                               "backends count as agreeing (bf16 vs fp32 math)")


# ---------------------------------------------------------------- documents
def load_set(cfg: PerplexitySetConfig) -> list[tuple[str, str]]:
    """(id, text) pairs of the set, filtered and sorted by id (a stable order for caching and limits)."""
    import pandas as pd

    p = str(cfg.path)
    if p.endswith(".jsonl"):
        df = pd.read_json(p, lines=True)
    else:
        from definemed.data.loaders import resolve_files

        files, _ = resolve_files(p, (".parquet",))
        df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    for col, val in cfg.where.items():
        df = df[df[col].astype(str) == val]
    if cfg.id_column not in df.columns:
        df = df.assign(**{cfg.id_column: [str(i) for i in range(len(df))]})
    df = df[df[cfg.text_column].notna() & (df[cfg.text_column].astype(str).str.strip() != "")]
    if cfg.exclude_trained:
        from definemed.train.split import trained_ids

        df = df[~df[cfg.id_column].astype(str).isin(trained_ids(cfg.exclude_trained))]
    df = df.assign(_id=df[cfg.id_column].astype(str)).sort_values("_id")
    if cfg.split:
        from definemed.train.split import dev_test_split

        keep = {i for i, _ in dev_test_split(list(zip(df["_id"], df["_id"])), cfg.split_seed, cfg.split)}
        df = df[df["_id"].isin(keep)]
    if cfg.limit:
        df = df.head(cfg.limit)
    return list(zip(df["_id"], df[cfg.text_column].astype(str)))


def tokenize_docs(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens (<bos>), cut to max_tokens; both backends score these."""
    return [list(ids[:max_tokens]) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


# ---------------------------------------------------------------- backends
def nll_transformers(model, docs: Sequence[Sequence[int]]) -> list[float]:
    """Summed NLL of tokens 1..n-1 of each document, one forward pass per document (fp32 softmax)."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for ids in docs:
            x = torch.tensor([list(ids)])
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            out.append(float(F.cross_entropy(logits, x[0, 1:], reduction="sum")))
    return out


def nll_vllm(llm, docs: Sequence[Sequence[int]]) -> list[float]:
    """Summed NLL from vLLM prompt logprobs: `prompt_logprobs=0` returns the logprob of each prompt token."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    results = llm.generate([{"prompt_token_ids": list(ids)} for ids in docs], sp, use_tqdm=False)
    out = []
    for ids, res in zip(docs, results):
        plp = res.prompt_logprobs
        out.append(-sum(plp[i][ids[i]].logprob for i in range(1, len(ids))))
    return out


# ---------------------------------------------------------------- statistics
def token_weighted_ppl(nll: Sequence[float], n_tokens: Sequence[int], n_boot: int = 1000,
                       seed: int = 0) -> Estimate:
    """exp(sum NLL / sum tokens) with a percentile bootstrap CI over documents."""
    rows = np.column_stack([np.asarray(nll, dtype=float), np.asarray(n_tokens, dtype=float)])
    return bootstrap_ci(rows, stat=lambda r: math.exp(r[:, 0].sum() / r[:, 1].sum()), n_boot=n_boot, seed=seed)


def summarize(per_doc: dict, n_boot: int, seed: int, tolerance: float) -> list[dict]:
    """Rows (model, set, backend, ppl, CI, docs, tokens) plus an `agree` verdict per (model, set)."""
    rows = []
    for model, sets in per_doc.items():
        for set_name, rec in sets.items():
            values = {}
            for backend, nll in rec["nll"].items():
                est = token_weighted_ppl(nll, rec["targets"], n_boot=n_boot, seed=seed)
                values[backend] = est.value
                rows.append({"model": model, "set": set_name, "backend": backend, **est.as_dict(),
                             "docs": len(nll), "tokens": int(sum(rec["targets"]))})
            if len(values) > 1:
                lo, hi = min(values.values()), max(values.values())
                rel = (hi - lo) / lo if lo > 0 else float("inf")
                for r in rows[-len(values):]:
                    r.update(rel_diff=rel, agree=bool(rel <= tolerance))
    return rows


# ---------------------------------------------------------------- one model (runs as a Ray task)
def score_model(path: str, docs_by_set: dict[str, list[list[int]]], backends: Sequence[Backend],
                engine: dict | None = None) -> dict:
    """NLLs of every set's documents under each backend, for one model. Engines are built and freed in turn."""
    import gc

    out: dict = {name: {"targets": [len(d) - 1 for d in docs], "nll": {}} for name, docs in docs_by_set.items()}
    for backend in backends:
        if backend == "vllm":
            from definemed.engine import EngineConfig, make_llm

            ecfg = EngineConfig(**(engine or {}))
            need = max((len(d) for docs in docs_by_set.values() for d in docs), default=2) + 1
            if ecfg.max_model_len < need:
                ecfg = ecfg.model_copy(update={"max_model_len": need})
            llm = make_llm(path, ecfg, sole_engine=True)  # a max_calls=1 Ray task
            try:
                for name, docs in docs_by_set.items():
                    out[name]["nll"]["vllm"] = nll_vllm(llm, docs)
            finally:
                del llm
                gc.collect()
        else:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, docs in docs_by_set.items():
                out[name]["nll"]["transformers"] = nll_transformers(model, docs)
            del model
            gc.collect()
    return out


def prepare_docs(path: str, sets: dict[str, list[tuple[str, str]]], max_tokens: int) -> dict[str, list[list[int]]]:
    """Token ids of every set with this model's tokenizer (models with different tokenizers get their own)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return {name: tokenize_docs(tok, [t for _, t in docs], max_tokens) for name, docs in sets.items()}


def fingerprint_sets(sets: dict[str, list[tuple[str, str]]]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).hexdigest()[:16]


def read_cached(f: Path, fp: str) -> dict | None:
    if f.exists():
        saved = json.loads(f.read_text(encoding="utf-8"))
        if saved.get("fingerprint") == fp:
            return saved["per_set"]
    return None
