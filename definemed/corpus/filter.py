"""Filter at scale: score every document with the classifier in an autoscaling Ray Data actor pool, keep
score >= threshold, then exact dedup, fuzzy dedup (MinHash LSH), decontamination and PII redaction; write
FineMed-de and its stats.

Everything streams: the driver never holds the corpus or the kept set and nothing is materialised. Document
counts come from the Parquet footers.

  A. source parts -> ingest/quarantine -> Scorer actor pool -> `scored/` (id, score, words for every document;
     text only where kept, so the not-kept 98% costs a few bytes a row and re-thresholding upward needs no
     rescoring). The hours-long pass is crash-safe the way datatrove's and NeMo Curator's tasks are: the source
     is cut into numbered parts from the Parquet footers; each part is one task that writes its output part
     (`part-<index>.parquet`, atomically) and then its completion marker (`_parts/part-<index>.json`, with its
     stats). A rerun with the same key scores only the parts without a marker; reading the parts in index order
     gives the rows of an uninterrupted run in the same order.
  B. `scored/` kept rows -> exact dedup (hash shuffle) -> `deduped/`
  C. `deduped/` -> MinHash LSH -> near-duplicate set (the only thing collected on the driver: documents that
     have a near-duplicate) -> drop, decontaminate, redact PII -> `finemed_de/` (text, score, id) + stats.
B and C write one Parquet file per block into a temporary directory renamed into place when the pass succeeds,
and return one row of stats per block, which the driver sums. A killed job resumes A where it stopped, and
B and C from their start (they cost a fraction of A).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from definemed.corpus.config import FilterConfig

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

log = logging.getLogger(__name__)
STUDY = {"source": {"docs": 427.7e6, "words": 234.8e9}, "filtered": {"docs": 7.3e6, "words": 5.1e9}}
FINAL_COLUMNS = ("text", "score", "id")


def scored_schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("score", pa.float64()), ("words", pa.int64()), ("text", pa.string())])


def final_schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([("text", pa.string()), ("score", pa.float64()), ("id", pa.string())])


def mark_kept(batch: "pa.Table", threshold: float) -> "pa.Table":
    """Keep the text only for kept documents; explicit schema so all-dropped batches still line up."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from definemed.text import word_count

    score = batch.column("score").cast(pa.float64())
    text = batch.column("text").cast(pa.string())
    kept = pc.greater_equal(score, threshold)
    return pa.table({"id": batch.column("id").cast(pa.string()), "score": score,
                     "words": pa.array([word_count(t) for t in text.to_pylist()], type=pa.int64()),
                     "text": pc.if_else(kept, text, pa.scalar(None, pa.string()))}, schema=scored_schema())


class PartScorer:
    """Scores whole source parts (one descriptor row each): read, quarantine, score in batches, write the output
    part, then its completion marker. The marker is written last, so a part killed half-way has none and is
    scored again from its start. A callable class so the model loads once per actor of the pool."""

    def __init__(self, source_path: str, read: list[str], rename: dict[str, str], out_dir: str, quarantine_dir: str,
                 threshold: float, max_chars: int, batch_size: int, model_dir: str | None = None, **scorer_kw):
        from definemed.corpus.score import Scorer

        self.scorer = Scorer(model_dir, **scorer_kw) if model_dir else None
        self.source_path, self.read, self.rename = source_path, read, rename
        self.out_dir, self.quarantine_dir = out_dir, quarantine_dir
        self.threshold, self.max_chars, self.batch_size = threshold, max_chars, batch_size

    def _score(self, table: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        from definemed.corpus.score import keyword_score

        if self.scorer is None:
            return keyword_score(table)
        texts = table.column("text").to_pylist()
        scores = [s for i in range(0, len(texts), self.batch_size)
                  for s in self.scorer.score_texts(texts[i:i + self.batch_size])]
        return table.append_column("score", pa.array(scores, type=pa.float64()))

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        from definemed.corpus.ingest import quarantine_batch
        from definemed.data.loaders import read_web_part

        rows = []
        for part in batch.to_pylist():
            table = read_web_part(self.source_path, part, self.read, self.rename)
            good = quarantine_batch(table, self.quarantine_dir, self.max_chars, name=part_file(part["index"]))
            scored = mark_kept(self._score(good), self.threshold)
            rows.append({**write_scored(scored, self.out_dir, part_file(part["index"])),
                         "read": table.num_rows, "quarantined": table.num_rows - good.num_rows})
            mark_part_done(self.out_dir, part["index"], rows[-1])
        return pa.Table.from_pylist(rows)


def scorer_stage(ds: "ray.data.Dataset", cfg: FilterConfig, **part_kw) -> "ray.data.Dataset":
    """The autoscaling actor pool over part descriptors: Ray Data adds actors (up to max_actors) while the pool is
    the bottleneck and removes idle ones down to min_actors."""
    from ray.data import ActorPoolStrategy

    part_kw.update(threshold=cfg.threshold, max_chars=cfg.max_text_chars, batch_size=cfg.batch_size)
    if cfg.scorer == "keywords":
        return ds.map_batches(PartScorer, batch_size=1, batch_format="pyarrow", fn_constructor_kwargs=part_kw,
                              compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors))
    threads = cfg.torch_threads or max(1, int(cfg.num_cpus_per_actor))
    return ds.map_batches(PartScorer, batch_size=1, batch_format="pyarrow",
                          compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
                          fn_constructor_kwargs={**part_kw, "model_dir": str(Path(cfg.classifier).resolve()),
                                                 "max_length": cfg.max_length, "torch_threads": threads,
                                                 "micro_batch": cfg.micro_batch},
                          num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None)


def score_key(cfg: FilterConfig) -> dict[str, Any]:
    """What the scores depend on: a `scored/` dir with another key is recomputed, never reused."""
    from definemed.lineage import hash_path

    return {"source": cfg.source.model_dump(mode="json"), "scorer": cfg.scorer,
            "classifier": hash_path(cfg.classifier) if cfg.scorer == "classifier" else None,
            "threshold": cfg.threshold, "max_length": cfg.max_length, "max_text_chars": cfg.max_text_chars}


# ------------------------------------------------------------------------------------------------ per-block I/O


def part_name(batch: "pa.Table", column: str = "id") -> str:
    """A name from the block's rows: a retried task rewrites its own file instead of adding a duplicate."""
    h = hashlib.sha1("\n".join(map(str, batch.column(column).to_pylist())).encode("utf-8")).hexdigest()[:20]
    return f"part-{h}.parquet"


def _write(table: "pa.Table", out_dir: str, name: str) -> None:
    from definemed.io import write_parquet_atomic

    write_parquet_atomic(table, Path(out_dir) / name)


def _stats_row(**counts: int) -> "pa.Table":
    import pyarrow as pa

    return pa.table({k: pa.array([int(v)], type=pa.int64()) for k, v in counts.items()})


def sum_stats(rows: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in rows:
        for k, v in r.items():
            total[k] = total.get(k, 0) + int(v or 0)
    return total


def run_blocks(ds: "ray.data.Dataset", progress: Callable[[int], None] | None = None,
               count: str = "docs") -> dict[str, int]:
    """Execute a pipeline that ends in a per-block writer; `progress(n)` is called as each block lands, with the
    sum of its `count` column."""
    def blocks():
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if progress is not None:
                progress(int(sum(b.column(count).to_pylist())) if count in b.column_names else 0)
            yield b

    # the driver sees one small stats row per block, never the data
    return sum_stats(row for b in blocks() for row in b.to_pylist())


def parquet_counts(path: Path, null_column: str | None = None) -> tuple[int, int]:
    """(rows, nulls in null_column) of a Parquet directory from the footers only."""
    import pyarrow.parquet as pq

    rows = nulls = 0
    for f in sorted(Path(path).glob("*.parquet")):
        md = pq.ParquetFile(f).metadata
        rows += md.num_rows
        if null_column is None:
            continue
        idx = md.schema.names.index(null_column)
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(idx).statistics
            if st is None or not st.has_null_count:  # pyarrow always writes it; another writer may not
                import pyarrow.compute as pc

                col = pq.read_table(f, columns=[null_column]).column(null_column)
                nulls += int(pc.sum(pc.is_null(col)).as_py() or 0)
                break
            nulls += st.null_count
    return rows, nulls


def write_scored(batch: "pa.Table", out_dir: str, name: str) -> dict[str, int]:
    """One output part, written even when empty: every input part has exactly one."""
    import pyarrow.compute as pc

    kept = pc.is_valid(batch.column("text"))
    words = batch.column("words")
    _write(batch, out_dir, name)
    return {"docs": batch.num_rows, "words": pc.sum(words).as_py() or 0,
            "kept_docs": pc.sum(kept.cast("int64")).as_py() or 0,
            "kept_words": pc.sum(pc.if_else(kept, words, 0)).as_py() or 0}


def write_rows(batch: "pa.Table", out_dir: str) -> "pa.Table":
    if batch.num_rows:
        _write(batch, out_dir, part_name(batch))
    return _stats_row(docs=batch.num_rows)


def write_final(batch: "pa.Table", out_dir: str, removed_dir: str) -> "pa.Table":
    """FineMed-de rows to out_dir, contaminated (id, contaminated_by) to removed_dir; one stats row."""
    import pyarrow.compute as pc

    from definemed.corpus.pii import KINDS
    from definemed.text import word_count

    if "contaminated_by" in batch.column_names:
        dirty = pc.is_valid(batch.column("contaminated_by"))
        removed = batch.filter(dirty)
        clean = batch.filter(pc.invert(dirty))
    else:
        removed, clean = batch.slice(0, 0), batch
    if removed.num_rows:
        _write(removed.select(["id", "contaminated_by"]), removed_dir, part_name(removed))
    if clean.num_rows:
        _write(clean.select(list(FINAL_COLUMNS)).cast(final_schema()), out_dir, part_name(clean))
    rules = removed.column("contaminated_rule").to_pylist() if removed.num_rows else []
    pii = {f"pii_{k}": (pc.sum(clean.column(f"pii_{k}")).as_py() or 0) if f"pii_{k}" in clean.column_names else 0
           for k in KINDS}
    return _stats_row(docs=batch.num_rows, contaminated=removed.num_rows,
                      contaminated_ngram=rules.count("ngram"), contaminated_whole_item=rules.count("whole_item"),
                      final_docs=clean.num_rows,
                      final_words=sum(word_count(t) for t in clean.column("text").to_pylist()), **pii)


_REFS: dict[str, Any] = {}


def _fetch(ref):
    """An ObjectRef fetched once per worker process, not shipped with every task."""
    import ray

    key = ref.hex()
    if key not in _REFS:
        _REFS.clear()
        _REFS[key] = ray.get(ref)
    return _REFS[key]


def drop_docs(batch: "pa.Table", removed) -> "pa.Table":
    """Drop the near-duplicates (content hashes in `removed`, an ObjectRef to a pyarrow array)."""
    import pyarrow.compute as pc

    return batch.filter(pc.invert(pc.is_in(batch.column("content_hash"), value_set=_fetch(removed))))


# ------------------------------------------------------------------------------------------------ the passes


PARTS_DIR = "_parts"  # completion markers, one per finished part, each holding the part's stats
SCORE_KEY = "_KEY.json"  # what the parts were scored with; a dir with another key is scored afresh


def part_file(index: int) -> str:
    return f"part-{index:06d}.parquet"


def mark_part_done(out_dir: str, index: int, stats: dict[str, int]) -> None:
    from definemed.io import atomic_write_json

    atomic_write_json(Path(out_dir) / PARTS_DIR / f"part-{index:06d}.json", stats)


def done_parts(out_dir: Path) -> dict[int, dict[str, int]]:
    """Stats of every finished part, by index."""
    return {int(p.stem.split("-")[1]): json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((Path(out_dir) / PARTS_DIR).glob("part-*.json"))}


def score_pass(cfg: FilterConfig, scored_dir: Path, quarantine_dir: Path, key: dict[str, Any] | None = None,
               progress: Callable[[int], None] | None = None) -> dict:
    """Score every part of the source not yet done in `scored_dir`; return the summed stats of all parts, with
    `parts`, `parts_reused` and `docs_scored_now` (what this call scored) added."""
    import ray.data

    from definemed.corpus.ingest import reset_quarantine
    from definemed.data.loaders import plan_web_parts
    from definemed.io import atomic_write_json

    plan = plan_web_parts(cfg.source, cfg.block_rows)
    # The plan is part of the key: a changed source or part size means other parts, never a mix.
    key = json.loads(json.dumps({**(key or score_key(cfg)), "parts": len(plan["parts"]),
                                 "rows_per_part": cfg.block_rows, "files": plan["files"]}))  # as read back
    key_file = scored_dir / SCORE_KEY
    if not (key_file.exists() and json.loads(key_file.read_text(encoding="utf-8")) == key):
        shutil.rmtree(scored_dir, ignore_errors=True)
        reset_quarantine(str(quarantine_dir))
        (scored_dir / PARTS_DIR).mkdir(parents=True)
        atomic_write_json(key_file, key)
    done = done_parts(scored_dir)
    todo = [p for p in plan["parts"] if p["index"] not in done]
    if done:
        log.warning("[filter] resuming the scoring pass: %d of %d parts already scored in %s", len(done),
                    len(plan["parts"]), scored_dir)
        if progress is not None:
            progress(sum(d["read"] for d in done.values()))
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    now: dict[str, int] = {}
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = scorer_stage(ds, cfg, source_path=cfg.source.path, read=plan["read"], rename=plan["rename"],
                          out_dir=str(scored_dir), quarantine_dir=str(quarantine_dir))
        now = run_blocks(ds, progress, count="read")
    stats = sum_stats(done_parts(scored_dir).values())
    missing = len(plan["parts"]) - len(done_parts(scored_dir))
    if missing:
        raise RuntimeError(f"the scoring pass ended with {missing} parts unscored; re-run to resume them")
    stats.update(parts=len(plan["parts"]), parts_reused=len(done), docs_scored_now=now.get("docs", 0))
    atomic_write_json(scored_dir / "_STATS.json", stats)
    atomic_write_json(scored_dir / "_SCORED.json", key)
    return stats


def _partitions(cfg: FilterConfig, rows: int) -> int:
    return cfg.shuffle_partitions or max(1, math.ceil(rows / cfg.rows_per_partition))


def dedup_pass(cfg: FilterConfig, scored_dir: Path, deduped_dir: Path, kept_docs: int) -> None:
    import ray.data
    from ray.data.expressions import col

    from definemed.corpus import dedup
    from definemed.io import atomic_dir

    kept = ray.data.read_parquet(str(scored_dir)).filter(expr=col("text").is_not_null())
    ds = kept.select_columns(["id", "score", "text"]).map_batches(dedup.add_hash, batch_format="pyarrow")
    if cfg.dedup and kept_docs:
        ds = dedup.dedup(ds, _partitions(cfg, kept_docs))
    with atomic_dir(deduped_dir, overwrite=True) as tmp:
        run_blocks(ds.map_batches(write_rows, batch_format="pyarrow", batch_size=None,
                                  fn_kwargs={"out_dir": str(tmp)}))


def fuzzy_pass(cfg: FilterConfig, deduped_dir: Path, docs: int) -> tuple[list[str], dict[str, Any]]:
    import ray.data

    from definemed.corpus import fuzzy

    f = cfg.fuzzy_dedup
    info: dict[str, Any] = {"enabled": f.enabled}
    if not (f.enabled and docs):
        return [], info
    params = fuzzy.MinHashParams(ngram=f.ngram, bands=f.bands, rows=f.rows, seed=f.seed)
    removed, st = fuzzy.find_duplicates(ray.data.read_parquet(str(deduped_dir)), params,
                                        _partitions(cfg, docs * params.bands))
    info.update(st, ngram=f.ngram, bands=f.bands, rows=f.rows, permutations=params.num_perm,
                threshold=round(params.threshold(), 3))
    return sorted(removed), info


def clean_pass(cfg: FilterConfig, scored_dir: Path, out_dir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import ray
    import ray.data

    from definemed.corpus import decontam, pii
    from definemed.io import atomic_dir, write_parquet_atomic

    rows, nulls = parquet_counts(scored_dir, "text")
    scored = json.loads((scored_dir / "_STATS.json").read_text(encoding="utf-8"))
    stats: dict[str, Any] = {"scored_docs": rows, "scored_words": scored["words"], "kept_docs": rows - nulls,
                             "kept_words": scored["kept_words"]}
    deduped = out_dir / "deduped"
    dedup_pass(cfg, scored_dir, deduped, stats["kept_docs"])
    stats["after_dedup_docs"] = parquet_counts(deduped)[0]
    stats["duplicates_removed"] = stats["kept_docs"] - stats["after_dedup_docs"]

    removed, stats["fuzzy_dedup"] = fuzzy_pass(cfg, deduped, stats["after_dedup_docs"])
    stats["near_duplicates_removed"] = len(removed)
    stats["after_fuzzy_dedup_docs"] = stats["after_dedup_docs"] - len(removed)

    ds = ray.data.read_parquet(str(deduped)) if stats["after_dedup_docs"] else None
    if ds is not None and removed:
        ds = ds.map_batches(drop_docs, batch_format="pyarrow",
                            fn_kwargs={"removed": ray.put(pa.array(removed, type=pa.string()))})
    index_info: dict[str, Any] = {"enabled": cfg.decontam.enabled}
    if cfg.decontam.enabled:
        idx = decontam.build_index(decontam.eval_items(cfg.decontam.mc, cfg.decontam.prompts), cfg.decontam.ngram,
                                   cfg.decontam.min_item_words)
        index_info.update(idx.info())
        if ds is not None:  # plain tasks: the index travels once through the object store
            ds = ds.map_batches(decontam.mark_contaminated, batch_format="pyarrow", fn_kwargs={"index": ray.put(idx)})
    if cfg.pii and ds is not None:
        ds = ds.map_batches(pii.redact_batch, batch_format="pyarrow")

    final_dir, parts = out_dir / "finemed_de", out_dir / ".decontaminated.parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    with atomic_dir(final_dir, overwrite=True) as tmp:
        summ = run_blocks(ds.map_batches(write_final, batch_format="pyarrow", batch_size=None,
                                         fn_kwargs={"out_dir": str(tmp), "removed_dir": str(parts)})) if ds else {}
        if not any(tmp.glob("*.parquet")):  # an empty FineMed-de is still a readable dataset
            write_parquet_atomic(final_schema().empty_table(), tmp / "part-empty.parquet")
    stats["contaminated_removed"] = summ.get("contaminated", 0)
    stats["contaminated_by_rule"] = {r: summ.get(f"contaminated_{r}", 0) for r in decontam.RULES}
    stats["final_docs"] = parquet_counts(final_dir)[0]
    stats["final_words"] = summ.get("final_words", 0)
    stats["pii_redacted"] = {k: summ.get(f"pii_{k}", 0) for k in pii.KINDS}
    stats["decontam"] = index_info
    if cfg.decontam.enabled:
        import pyarrow.parquet as pq

        files = sorted(parts.glob("*.parquet"))
        removed_t = (pa.concat_tables([pq.read_table(f) for f in files]) if files else
                     pa.table({"id": pa.array([], pa.string()), "contaminated_by": pa.array([], pa.string())}))
        write_parquet_atomic(removed_t.sort_by("id"), out_dir / "decontaminated.parquet")
    shutil.rmtree(parts, ignore_errors=True)
    return stats


# ------------------------------------------------------------------------------------------------ the report


def demo_note(classifier: str, source_docs: int, scorer: str = "classifier") -> str:
    """The caveat printed beside the study's figures: this run's numbers are not the study's."""
    tiny = (Path(classifier) / "TINY_MODEL.md").exists()
    parts = []
    if scorer == "keywords":
        parts.append("Scored with the keyword stand-in, not the classifier: the kept set is a crude keyword cut.")
        tiny = False
    if tiny:
        parts.append("The classifier is a tiny randomly initialised model: which documents it keeps is noise, so "
                     "the kept fractions below carry no meaning.")
    if source_docs < STUDY["source"]["docs"] / 100:
        parts.append(f"This run read {source_docs:,} documents, not FineWeb2-de's 427.7M: the study's rows are "
                     "printed for orientation only; compare fractions, not counts, and only with a trained "
                     "classifier on a real corpus.")
    return " ".join(parts)


def stats_table(stats: dict[str, Any], quarantine: dict[str, int], threshold: float,
                note: str | None = None) -> tuple[dict, str]:
    """The study's table (documents and words, source vs filtered) plus the funnel in between."""
    src_docs = stats["scored_docs"] + quarantine.get("total", 0)
    rows = [
        ("source (read)", src_docs, stats["scored_words"]),
        ("quarantined (malformed)", quarantine.get("total", 0), None),
        (f"score >= {threshold:g}", stats["kept_docs"], stats["kept_words"]),
        ("after exact dedup", stats["after_dedup_docs"], None),
        ("after fuzzy dedup (MinHash LSH)", stats.get("after_fuzzy_dedup_docs", stats["after_dedup_docs"]), None),
        ("after decontamination = FineMed-de", stats["final_docs"], stats["final_words"]),
    ]
    table = {"source": {"docs": src_docs, "words": stats["scored_words"]},
             "filtered": {"docs": stats["final_docs"], "words": stats["final_words"]},
             "funnel": [{"step": s, "docs": d, "words": w} for s, d, w in rows], "study": STUDY,
             **({"note": note} if note else {})}

    def pct(a, b):
        return f"{100 * a / b:.2f}%" if b else "n/a"

    md = ["# FineMed-de filter statistics", ""]
    if note:
        md += [f"> **{note}**", ""]
    md += ["| corpus | documents | words |", "| --- | ---: | ---: |",
           f"| this run: source | {src_docs:,} | {stats['scored_words']:,} (well-formed docs) |",
           f"| this run: FineMed-de | {stats['final_docs']:,} ({pct(stats['final_docs'], src_docs)}) | "
           f"{stats['final_words']:,} ({pct(stats['final_words'], stats['scored_words'])}) |",
           "| study: FineWeb2-de | 427.7M | 234.8B |",
           "| study: FineMed-de | 7.3M (1.71%) | 5.1B (2.17%) |", "",
           "Words are `definemed.text.words` (runs of letters, hyphenated compounds whole), not the study's "
           "word tokenizer.", "",
           "## Funnel", "", "| step | documents | words |", "| --- | ---: | ---: |"]
    md += [f"| {s} | {d:,} | {'' if w is None else f'{w:,}'} |" for s, d, w in rows]
    fz = stats.get("fuzzy_dedup", {})
    md += ["", "Quarantine reasons: " + ", ".join(f"{k} {v}" for k, v in quarantine.items() if v and k != "total"),
           f"Exact duplicates removed: {stats['duplicates_removed']}; near-duplicates removed: "
           f"{stats.get('near_duplicates_removed', 0)} in {fz.get('clusters', 0)} clusters ({fz}).",
           f"Contaminated removed: {stats['contaminated_removed']} (by rule: {stats.get('contaminated_by_rule', {})};"
           f" index: {stats['decontam']}).",
           "PII redacted in kept text: " + ", ".join(f"{k} {v}" for k, v in stats["pii_redacted"].items()), ""]
    return table, "\n".join(md)
