"""The `tokenizers` stage: fertility, split share and parity of every configured tokenizer on every set, in one
streaming pass per set; writes fertility.{json,csv,md,png} beside the stage's lineage."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from definemed.tokenizers.config import DocumentSet, ParallelSet, TokenizersConfig

log = logging.getLogger(__name__)

DEFINITIONS = {
    "word": "definemed.text.words: a run of letters or of digits, hyphenated compounds whole",
    "fertility": "tokens / words over the set, each text tokenized whole, special tokens excluded",
    "split_share": "words to which 2 or more tokens are attributed / words; a token is attributed to every word "
                   "whose characters its offsets overlap",
    "parity": "tokens of the German sentences / tokens of their English translations over the parallel set "
              "(Petrov et al. 2023: ratio of totals)",
    "ci": "percentile bootstrap over texts (fertility) or pairs (parity), definemed.eval.stats.bootstrap_ci",
}


def measure(cfg: TokenizersConfig, counters: list) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows: one per set and tokenizer, sets: what each set held)."""
    from tqdm import tqdm

    from definemed.tokenizers.fertility import SetMeasure
    from definemed.tokenizers.sets import check_document_set, iter_documents, iter_pairs

    names = [c.name for c in counters]
    rows: list[dict[str, Any]] = []
    sets: list[dict[str, Any]] = []
    for s in cfg.sets:
        m = SetMeasure(names, parallel=isinstance(s, ParallelSet), ci_sample=cfg.ci_sample, seed=cfg.seed)
        if isinstance(s, DocumentSet):
            n_rows = check_document_set(s)  # every file has the columns, before any work
            total = None if s.where else min(n_rows, s.limit or n_rows)
            with tqdm(total=total, desc=f"[tokenizers] {s.name}", unit="doc") as bar:
                for texts in iter_documents(s, cfg.batch_size):
                    m.add_batch(counters, texts)
                    bar.update(len(texts))
        else:
            with tqdm(desc=f"[tokenizers] {s.name}", unit="pair") as bar:
                for de, en in iter_pairs(s, cfg.batch_size):
                    m.add_batch(counters, de, en)
                    bar.update(len(de))
        res = m.results(cfg.n_boot)
        first = res[names[0]]
        sets.append({"name": s.name, "kind": s.kind, "description": s.description, "path": s.path,
                     "texts": first["texts"], "words": first["words"], "limit": s.limit,
                     **({"where": s.where} if isinstance(s, DocumentSet) and s.where else {})})
        for c in counters:
            rows.append({"tokenizer": c.name, "family": c.family, "tiny": c.tiny, "vocab_size": c.vocab_size,
                         "set": s.name, "set_kind": s.kind, **res[c.name]})
    return rows, sets


def run(cfg: TokenizersConfig) -> dict[str, str]:
    from definemed.io import atomic_write_json, atomic_write_text
    from definemed.tokenizers import report
    from definemed.tokenizers.sources import load_counter

    out = Path(cfg.output_dir)
    counters = []
    for t in cfg.tokenizers:
        counters.append(load_counter(t.name, t.source, t.family))
        log.info("[tokenizers] loaded %s (%s): vocabulary %d", t.name, t.source, counters[-1].vocab_size)
    rows, sets = measure(cfg, counters)
    doc = {"definitions": DEFINITIONS, "tokenizers": [c.info() for c in counters], "sets": sets, "rows": rows,
           "n_boot": cfg.n_boot, "seed": cfg.seed}
    doc["notes"] = report.notes(doc)
    md = report.markdown(doc)
    atomic_write_json(out / report.TABLE_JSON, doc)
    atomic_write_text(out / report.TABLE_CSV, report.to_csv(doc))
    atomic_write_text(out / report.TABLE_MD, md)
    plot = report.plot(doc, out / report.PLOT)
    print(md, flush=True)
    return {"table_json": str(out / report.TABLE_JSON), "table_csv": str(out / report.TABLE_CSV),
            "table_md": str(out / report.TABLE_MD), "plot": str(plot)}
