"""The corpus stages (`annotate`, `classify-train`, `filter`): thin orchestration over the step modules."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from definemed.corpus.config import AnnotateConfig, ClassifyConfig, FilterConfig
from definemed.models import is_tiny_ref

log = logging.getLogger(__name__)

TINY_ANNOTATOR_NOTE = ("The annotator is a tiny randomly initialised model: its labels are noise and the quality "
                       "numbers below carry no meaning. They prove the code path; use a real annotator "
                       "(configs/cluster/annotate.yaml) for real labels.")


def _say(msg: str) -> None:
    print(msg, flush=True)
    log.info(msg)


# ------------------------------------------------------------------------------------------------ annotate


def write_sample(cfg: AnnotateConfig, sample_dir: Path, quarantine_dir: Path) -> dict:
    """Draw the seeded sample once and store it as per-shard Parquet files (the unit of resume)."""
    import pyarrow as pa
    import ray.data

    from definemed.corpus import ingest, sample
    from definemed.data.loaders import count_web_rows
    from definemed.io import atomic_dir, atomic_write_json, write_parquet_atomic

    marker = sample_dir / "_SAMPLE.json"
    key = {"source": cfg.source.model_dump(mode="json"), "sample_size": cfg.sample_size, "seed": cfg.seed,
           "shard_size": cfg.shard_size, "max_text_chars": cfg.max_text_chars}
    if marker.exists():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("key") != key:
            from definemed.config import ConfigError

            raise ConfigError(f"invalid config field 'output_dir': {cfg.output_dir} holds a partial run drawn with "
                              "another sample config (source/sample_size/seed/shard_size); choose a new output_dir")
        return info
    ingest.reset_quarantine(str(quarantine_dir))
    total_hint = count_web_rows(cfg.source)  # Parquet footers only; malformed rows included
    ds = ingest.read_valid(cfg.source, str(quarantine_dir), cfg.max_text_chars)
    ctx = ray.data.DataContext.get_current()
    old, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        with atomic_dir(sample_dir, overwrite=True) as tmp:
            n = 0
            for i, df in sample.iter_shards(sample.take_sample(ds, cfg.sample_size, cfg.seed, total_hint),
                                            cfg.shard_size):
                df["id"] = df["id"].astype(str)
                df["shard"] = i
                write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), tmp / f"shard-{i:05d}.parquet")
                n += len(df)
            info = {"key": key, "docs": n, "shards": len(list(tmp.glob("shard-*.parquet"))), "seed": cfg.seed,
                    "requested": cfg.sample_size, "quarantine": ingest.quarantine_counts(str(quarantine_dir))}
            atomic_write_json(tmp / "_SAMPLE.json", info)
    finally:
        ctx.execution_options.preserve_order = old
    return info


def run_annotate(cfg: AnnotateConfig, max_shards: int | None = None, labeler=None) -> dict[str, str]:
    """`labeler` replaces the configured backend in unit tests only (a test double for the LLM)."""
    import pandas as pd
    import pyarrow as pa

    from definemed.corpus import annotate, quality
    from definemed.io import atomic_write_json, write_parquet_atomic

    out = Path(cfg.output_dir)
    sample_dir, ann_dir, q_dir = out / "sample", out / "annotations", out / "quarantine"
    info = write_sample(cfg, sample_dir, q_dir)
    _say(f"[annotate] sample: {info['docs']} docs in {info['shards']} shards (seed {cfg.seed}); "
         f"quarantined {info['quarantine']['total']}")
    if info["docs"] == 0:
        from definemed.config import ConfigError

        raise ConfigError(f"invalid config field 'source': no well-formed documents in {cfg.source.path}")
    tiny = cfg.backend == "vllm" and is_tiny_ref(cfg.model)
    if tiny:
        _say(f"[annotate] NOTE: {TINY_ANNOTATOR_NOTE}")
    model = annotate.model_id(cfg)
    annotate.check_resumable(ann_dir, model, annotate.load_prompt(cfg.prompt_version)[1], cfg.output_dir)
    run = annotate.annotate_shards(sample_dir, ann_dir, labeler or annotate.build_labeler(cfg), model,
                                   cfg.prompt_version, max_shards=max_shards)
    _say(f"[annotate] shards: {run['labelled_shards']} labelled now, {run['skipped_shards']} already done"
         + (f"; {run['resumed_rows']} labels kept from a killed run's unfinished shards" if run["resumed_rows"]
            else ""))
    outputs = {"sample": str(sample_dir), "annotations": str(ann_dir), "quarantine": str(q_dir)}
    if annotate.pending_shards(sample_dir, ann_dir):
        return outputs  # interrupted on purpose (max_shards); the next run resumes
    labels = annotate.combine(ann_dir)
    write_parquet_atomic(pa.Table.from_pandas(labels, preserve_index=False), out / "labels.parquet")
    counts = labels["label"].value_counts().to_dict()
    summary = {"docs": len(labels), "labels": {k: int(counts.get(k, 0)) for k in annotate.LABELS},
               "model": model, "prompt_version": cfg.prompt_version,
               "prompt_sha": annotate.load_prompt(cfg.prompt_version)[1], "backend": cfg.backend,
               "sample": info, "tiny_annotator": tiny}
    atomic_write_json(out / "summary.json", summary)
    _say(f"[annotate] labels: {summary['labels']}")
    outputs.update(labels=str(out / "labels.parquet"), summary=str(out / "summary.json"))
    sample_df = pd.concat([pd.read_parquet(p) for p in sorted(sample_dir.glob("shard-*.parquet"))])
    if cfg.gold_column and cfg.gold_column in sample_df.columns and sample_df[cfg.gold_column].notna().any():
        rep = quality.quality_report(labels, sample_df, cfg.gold_column, n_boot=cfg.bootstrap, seed=cfg.seed,
                                     note=TINY_ANNOTATOR_NOTE if tiny else None)
        j, md = quality.write_report(rep, out)
        f1 = rep["metrics"]["f1"]
        _say(f"[annotate] quality vs gold: F1 {100 * f1['value']:.1f} ± {100 * f1['std']:.1f} "
             f"(95% CI {100 * f1['ci_low']:.1f}-{100 * f1['ci_high']:.1f}); study 91.1 ± 2.5")
        outputs.update(quality_json=str(j), quality_md=str(md))
    return outputs


# ------------------------------------------------------------------------------------------------ classify


def run_classify(cfg: ClassifyConfig, shuffle_labels: bool = False) -> dict[str, str]:
    """`shuffle_labels` is the control experiment (tests): the same pipeline on permuted labels."""
    from definemed.corpus import classify
    from definemed.io import atomic_dir, atomic_write_json, atomic_write_text
    from definemed.lineage import write_manifest
    from definemed.models import resolve_model

    out = Path(cfg.output_dir)
    df, counts = classify.load_examples(cfg)
    notes = []
    if cfg.label_source == "gold":
        notes.append("label_source=gold: trained on the sample's human labels, not the LLM's (the demo's tiny "
                     "random annotator produces noise labels; the study trains on the annotator's labels).")
    else:
        ann_summary = Path(cfg.annotations) / "summary.json"
        if ann_summary.exists() and json.loads(ann_summary.read_text()).get("tiny_annotator"):
            notes.append("label_source=llm with a tiny random annotator: the labels are noise, so the classifier "
                         "cannot learn anything meaningful from them.")
    if is_tiny_ref(cfg.model):
        notes.append(f"The classifier starts from the tiny random {cfg.model} (no pre-training): its numbers show "
                     "that training works on this sample, not what xlm-roberta-base reaches.")
    if shuffle_labels:
        df = classify.shuffle_labels(df, cfg.seed)
        notes.append("CONTROL RUN: labels shuffled; the classifier must not learn.")
    for n in notes:
        _say(f"[classify-train] NOTE: {n}")
    _say(f"[classify-train] examples: {counts}")
    ckpt, history = classify.train(cfg, df, resolve_model(cfg.model), out / "ray_train", "classify")
    model_dir = out / "model"
    ev = classify.evaluate(ckpt, df, cfg)
    best = max(history, key=lambda r: (r.get("val_fbeta", -1), -r.get("val_loss", 0))) if history else {}
    rep = {"config": cfg.model_dump(mode="json", exclude={"ray"}), "counts": counts, "notes": notes,
           "history": history, "best_epoch": best.get("epoch"), "eval": ev}
    with atomic_dir(model_dir, overwrite=True) as tmp:
        import shutil

        for f in Path(ckpt).iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
    write_manifest(model_dir, "classify-train", cfg, inputs={"annotations": cfg.annotations},
                   extra={"at_threshold": ev["at_threshold"], "label_source": cfg.label_source, "notes": notes})
    classify.plot_pr(ev, cfg.threshold, out / "pr_curve.png",
                     f"XLM-R classifier, labels={cfg.label_source}, test n={ev['n_test']}")
    atomic_write_json(out / "report.json", rep)
    atomic_write_text(out / "report.md", classify.report_markdown(rep))
    at = ev["at_threshold"]
    _say(f"[classify-train] test @ {cfg.threshold:g}: precision {at['precision']:.3f} recall {at['recall']:.3f} "
         f"F1 {at['f1']:.3f} (study @0.9: P 0.95 R 0.80)")
    return {"model": str(model_dir), "report_json": str(out / "report.json"), "report_md": str(out / "report.md"),
            "pr_curve": str(out / "pr_curve.png")}


# ------------------------------------------------------------------------------------------------ filter


def run_filter(cfg: FilterConfig) -> dict[str, str]:
    from tqdm import tqdm

    from definemed.corpus import filter as filt
    from definemed.corpus.ingest import quarantine_counts
    from definemed.data.loaders import count_web_rows
    from definemed.io import atomic_write_json, atomic_write_text

    out = Path(cfg.output_dir)
    scored, q_dir = out / "scored", out / "quarantine"

    # Resumes by itself: only parts without a completion marker are scored (a different key starts afresh).
    with tqdm(total=count_web_rows(cfg.source), desc="[filter] scoring", unit="doc") as bar:
        scored_stats = filt.score_pass(cfg, scored, q_dir, filt.score_key(cfg), progress=bar.update)
    if scored_stats["parts_reused"]:
        _say(f"[filter] resumed: {scored_stats['parts_reused']} of {scored_stats['parts']} parts were already "
             f"scored in {scored}; scored {scored_stats['docs_scored_now']} documents now")
    stats = filt.clean_pass(cfg, scored, out)
    q = quarantine_counts(str(q_dir))
    note = filt.demo_note(cfg.classifier, stats["scored_docs"] + q.get("total", 0), cfg.scorer)
    table, md = filt.stats_table(stats, q, cfg.threshold, note=note or None)
    stats["scoring"] = {k: scored_stats[k] for k in ("parts", "parts_reused", "docs_scored_now")}
    atomic_write_json(out / "stats.json", {**table, "steps": stats, "quarantine": q,
                                           "threshold": cfg.threshold,
                                           "actors": {"min": cfg.min_actors, "max": cfg.max_actors}})
    atomic_write_text(out / "stats.md", md)
    print(md, flush=True)
    if stats["final_docs"] == 0:
        log.warning("[filter] FineMed-de is empty: no document scored >= %s", cfg.threshold)
    return {"finemed_de": str(out / "finemed_de"), "stats_json": str(out / "stats.json"),
            "stats_md": str(out / "stats.md"), "quarantine": str(q_dir), "scored": str(scored)}
