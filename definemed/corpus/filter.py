"""Filter at scale: score every document with the classifier in an autoscaling Ray Data actor pool, keep
score >= threshold, then exact dedup, decontamination and PII redaction; write FineMed-de and its stats.

Two passes, each written atomically so a killed job resumes at the second one:
  A. source -> ingest/quarantine -> Scorer actor pool -> `scored/` (id, score, words for every document; text
     only where kept, so the not-kept 98% costs a few bytes a row and re-thresholding upward needs no rescoring)
  B. `scored/` -> kept -> dedup -> decontam -> PII -> `finemed_de/` (text, score, id) + stats.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from definemed.corpus.config import FilterConfig

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import ray.data

log = logging.getLogger(__name__)
STUDY = {"source": {"docs": 427.7e6, "words": 234.8e9}, "filtered": {"docs": 7.3e6, "words": 5.1e9}}


def scored_schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("score", pa.float64()), ("words", pa.int64()), ("text", pa.string())])


def mark_kept(df: "pd.DataFrame", threshold: float) -> "pa.Table":
    """Keep the text only for kept documents; explicit schema so all-dropped batches still line up."""
    import pyarrow as pa

    kept = df["score"] >= threshold
    return pa.Table.from_pydict({
        "id": df["id"].astype(str).tolist(), "score": df["score"].astype(float).tolist(),
        "words": [len(t.split()) for t in df["text"]],
        "text": [t if k else None for t, k in zip(df["text"], kept)]}, schema=scored_schema())


def scorer_stage(ds: "ray.data.Dataset", model_dir: str, cfg: FilterConfig) -> "ray.data.Dataset":
    """The autoscaling actor pool: Ray Data adds actors (up to max_actors) while the pool is the bottleneck and
    removes idle ones down to min_actors."""
    from ray.data import ActorPoolStrategy

    from definemed.corpus.score import Scorer

    return ds.map_batches(Scorer, batch_size=cfg.batch_size, batch_format="pandas",
                          compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
                          fn_constructor_kwargs={"model_dir": model_dir, "max_length": cfg.max_length},
                          num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None)


def score_key(cfg: FilterConfig) -> dict[str, Any]:
    """What the scores depend on: a `scored/` dir with another key is recomputed, never reused."""
    from definemed.lineage import hash_path

    return {"source": cfg.source.model_dump(mode="json"), "classifier": hash_path(cfg.classifier),
            "threshold": cfg.threshold, "max_length": cfg.max_length, "max_text_chars": cfg.max_text_chars}


def score_pass(cfg: FilterConfig, scored_dir: Path, quarantine_dir: Path, key: dict[str, Any] | None = None) -> None:
    from definemed.corpus.ingest import read_valid, reset_quarantine
    from definemed.io import atomic_dir

    reset_quarantine(str(quarantine_dir))
    ds = read_valid(cfg.source, str(quarantine_dir), cfg.max_text_chars)
    ds = scorer_stage(ds, str(Path(cfg.classifier).resolve()), cfg)
    ds = ds.map_batches(mark_kept, batch_format="pandas", fn_kwargs={"threshold": cfg.threshold})
    from definemed.io import atomic_write_json

    with atomic_dir(scored_dir, overwrite=True) as tmp:
        ds.write_parquet(str(tmp))
        atomic_write_json(tmp / "_SCORED.json", key or score_key(cfg))


def _kept_only(df: "pd.DataFrame") -> "pd.DataFrame":
    from definemed.corpus.dedup import add_hash

    return add_hash(df[df["text"].notna()])


def _summary(df: "pd.DataFrame") -> "pd.DataFrame":
    import pandas as pd

    clean = df["contaminated_by"].isna() if "contaminated_by" in df.columns else pd.Series(True, index=df.index)
    return pd.DataFrame([{
        "docs": len(df), "contaminated": int((~clean).sum()),
        "final_docs": int(clean.sum()), "final_words": int(sum(len(t.split()) for t in df.loc[clean, "text"])),
        **{k: int(df.loc[clean, k].sum()) if k in df.columns else 0 for k in ("pii_email", "pii_ip", "pii_phone")},
    }])


def _final(df: "pd.DataFrame") -> "pa.Table":
    import pyarrow as pa

    if "contaminated_by" in df.columns:
        df = df[df["contaminated_by"].isna()]
    return pa.Table.from_pydict({"text": df["text"].tolist(), "score": df["score"].astype(float).tolist(),
                                 "id": df["id"].astype(str).tolist()},
                                schema=pa.schema([("text", pa.string()), ("score", pa.float64()), ("id", pa.string())]))


def _contaminated(df: "pd.DataFrame") -> "pd.DataFrame":
    return df.loc[df["contaminated_by"].notna(), ["id", "contaminated_by"]]


def clean_pass(cfg: FilterConfig, scored_dir: Path, out_dir: Path) -> dict[str, Any]:
    import ray
    import ray.data

    from definemed.corpus import decontam, dedup, pii
    from definemed.io import atomic_dir, write_parquet_atomic

    scored = ray.data.read_parquet(str(scored_dir))
    src = scored.select_columns(["words"]).materialize()
    stats: dict[str, Any] = {"scored_docs": src.count(), "scored_words": int(src.sum("words") or 0)}
    kept = scored.map_batches(_kept_only, batch_format="pandas").materialize()
    stats["kept_docs"] = kept.count()
    stats["kept_words"] = int(kept.sum("words") or 0) if stats["kept_docs"] else 0
    ds = kept
    if cfg.dedup and stats["kept_docs"]:
        ds = dedup.dedup(ds).materialize()
        stats["after_dedup_docs"] = ds.count()
    else:
        stats["after_dedup_docs"] = stats["kept_docs"]
    stats["duplicates_removed"] = stats["kept_docs"] - stats["after_dedup_docs"]
    index_info: dict[str, Any] = {"enabled": cfg.decontam.enabled}
    if cfg.decontam.enabled and stats["after_dedup_docs"]:
        idx = decontam.build_index(decontam.eval_items(cfg.decontam.mc, cfg.decontam.prompts), cfg.decontam.ngram)
        index_info.update(ngram=idx.n, items=idx.items, items_too_short=idx.too_short, ngrams=len(idx.grams))
        # Plain tasks: the index travels once through the object store; no actor start-up on small corpora.
        ds = ds.map_batches(decontam.mark_contaminated, batch_format="pandas", fn_kwargs={"index": ray.put(idx)})
    if cfg.pii and stats["after_dedup_docs"]:
        ds = ds.map_batches(pii.redact_batch, batch_format="pandas")
    ds = ds.materialize()
    summ = ds.map_batches(_summary, batch_format="pandas").to_pandas().sum() if stats["after_dedup_docs"] else {}
    stats["contaminated_removed"] = int(summ.get("contaminated", 0)) if len(summ) else 0
    stats["final_docs"] = int(summ.get("final_docs", 0)) if len(summ) else 0
    stats["final_words"] = int(summ.get("final_words", 0)) if len(summ) else 0
    stats["pii_redacted"] = {k.removeprefix("pii_"): int(summ.get(k, 0)) if len(summ) else 0
                             for k in ("pii_email", "pii_phone", "pii_ip")}
    stats["decontam"] = index_info
    final_dir = out_dir / "finemed_de"
    with atomic_dir(final_dir, overwrite=True) as tmp:
        ds.map_batches(_final, batch_format="pandas").write_parquet(str(tmp))
    if "contaminated_by" in ds.columns():
        import pyarrow as pa

        import pandas as pd

        removed = ds.map_batches(_contaminated, batch_format="pandas").to_pandas()
        if removed.empty:
            removed = pd.DataFrame({"id": pd.Series(dtype=str), "contaminated_by": pd.Series(dtype=str)})
        write_parquet_atomic(pa.Table.from_pandas(removed.sort_values("id"), preserve_index=False),
                             out_dir / "decontaminated.parquet")
    return stats


def stats_table(stats: dict[str, Any], quarantine: dict[str, int], threshold: float) -> tuple[dict, str]:
    """The study's table (documents and words, source vs filtered) plus the funnel in between."""
    src_docs = stats["scored_docs"] + quarantine.get("total", 0)
    rows = [
        ("source (read)", src_docs, stats["scored_words"]),
        ("quarantined (malformed)", quarantine.get("total", 0), None),
        (f"score >= {threshold:g}", stats["kept_docs"], stats["kept_words"]),
        ("after exact dedup", stats["after_dedup_docs"], None),
        ("after decontamination = FineMed-de", stats["final_docs"], stats["final_words"]),
    ]
    table = {"source": {"docs": src_docs, "words": stats["scored_words"]},
             "filtered": {"docs": stats["final_docs"], "words": stats["final_words"]},
             "funnel": [{"step": s, "docs": d, "words": w} for s, d, w in rows], "study": STUDY}

    def pct(a, b):
        return f"{100 * a / b:.2f}%" if b else "n/a"

    md = ["# FineMed-de filter statistics", "",
          "| corpus | documents | words |", "| --- | ---: | ---: |",
          f"| source | {src_docs:,} | {stats['scored_words']:,} (well-formed docs) |",
          f"| FineMed-de | {stats['final_docs']:,} ({pct(stats['final_docs'], src_docs)}) | "
          f"{stats['final_words']:,} ({pct(stats['final_words'], stats['scored_words'])}) |",
          f"| study: FineWeb2-de | 427.7M | 234.8B |",
          f"| study: FineMed-de | 7.3M (1.71%) | 5.1B (2.17%) |", "",
          "## Funnel", "", "| step | documents | words |", "| --- | ---: | ---: |"]
    md += [f"| {s} | {d:,} | {'' if w is None else f'{w:,}'} |" for s, d, w in rows]
    md += ["", f"Quarantine reasons: " + ", ".join(f"{k} {v}" for k, v in quarantine.items() if v and k != "total"),
           f"Duplicates removed: {stats['duplicates_removed']}; contaminated removed: "
           f"{stats['contaminated_removed']} ({stats['decontam']}).",
           "PII redacted in kept text: " + ", ".join(f"{k} {v}" for k, v in stats["pii_redacted"].items()), ""]
    return table, "\n".join(md)
