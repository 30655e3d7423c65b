"""LLM annotation: a versioned German rubric prompt, a constrained label choice, resumable shards.

Backends: Ray Data's LLM processor with the vLLM engine (default; the CPU build runs on laptops) or any
OpenAI-compatible HTTP endpoint. Either way the answer is constrained to the label strings; whatever still does
not match exactly is stored as `unparsed` with its raw text, never guessed.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from definemed.corpus.config import PROMPT_DIR, AnnotateConfig

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

log = logging.getLogger(__name__)

#: What the model may answer -> our label (the same vocabulary as the human gold labels).
CHOICES: dict[str, str] = {"medizinisch": "medical", "nicht medizinisch": "non_medical"}
UNPARSED = "unparsed"
LABELS = (*CHOICES.values(), UNPARSED)
ANNOTATION_COLUMNS = ("id", "label", "raw_answer", "error", "model", "prompt_version", "prompt_sha", "shard")


@lru_cache(maxsize=None)
def load_prompt(version: str) -> tuple[str, str]:
    """(template, sha256 prefix). The hash is stored with every label so an edited prompt file is noticed."""
    text = (PROMPT_DIR / f"annotate_{version}.txt").read_text(encoding="utf-8")
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def render_prompt(template: str, text: str, max_doc_chars: int) -> str:
    doc = text if len(text) <= max_doc_chars else text[:max_doc_chars] + " […]"
    return template.replace("{text}", doc)


def parse_answer(raw: object) -> str:
    """Exact label after trimming whitespace, quotes, a trailing full stop and case; else UNPARSED."""
    if not isinstance(raw, str):
        return UNPARSED
    s = raw.strip().strip("\"'„“”«»").strip().rstrip(".").strip().lower()
    return CHOICES.get(s, UNPARSED)


# ---------------------------------------------------------------------------------------------- backends
# Preprocess functions are module-level (not lambdas over cfg) so Ray can ship them cheaply.


def _vllm_preprocess(row: dict, template: str, max_doc_chars: int, max_tokens: int) -> dict:
    return {"id": row["id"], "shard": row["shard"],
            "messages": [{"role": "user", "content": render_prompt(template, row["text"], max_doc_chars)}],
            "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens,
                                "structured_outputs": {"choice": list(CHOICES)}}}


def _vllm_postprocess(row: dict) -> dict:
    return {"id": row["id"], "shard": row["shard"], "raw_answer": row.get("generated_text"), "error": None}


def _http_preprocess(row: dict, template: str, max_doc_chars: int, max_tokens: int, model: str,
                     choice_field: str) -> dict:
    payload = {"model": model, "temperature": 0.0, "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": render_prompt(template, row["text"], max_doc_chars)}]}
    if choice_field == "structured_outputs":
        payload["structured_outputs"] = {"choice": list(CHOICES)}
    elif choice_field == "guided_choice":
        payload["guided_choice"] = list(CHOICES)
    return {"id": row["id"], "shard": row["shard"], "payload": payload}


def _http_postprocess(row: dict) -> dict:
    resp = row.get("http_response") or {}
    try:
        raw, err = resp["choices"][0]["message"]["content"], None
    except (KeyError, IndexError, TypeError):
        raw, err = None, f"unexpected response: {str(resp)[:500]}"
    return {"id": row["id"], "shard": row["shard"], "raw_answer": raw, "error": err}


def build_labeler(cfg: AnnotateConfig) -> Callable[["ray.data.Dataset"], "ray.data.Dataset"]:
    """A function ds(id, shard, text) -> ds(id, shard, raw_answer, error) running the configured backend."""
    import os
    from functools import partial

    from ray.data.llm import build_processor

    template, _ = load_prompt(cfg.prompt_version)
    if cfg.backend == "vllm":
        from ray.data.llm import vLLMEngineProcessorConfig

        from definemed.engine import batch_engine_kwargs, engine_device, placement_group_config, prepare_env
        from definemed.models import resolve_model

        device = engine_device(cfg.engine)  # from config and the cluster, never this driver's hardware
        prepare_env(cfg.engine, device)
        pcfg = vLLMEngineProcessorConfig(
            model_source=resolve_model(cfg.model), engine_kwargs=batch_engine_kwargs(cfg.engine, device),
            batch_size=cfg.batch_size, concurrency=cfg.replica_bounds(),
            # One GPU per TP rank, or a CPU-only bundle (the default asks for a GPU and waits forever on a laptop).
            placement_group_config=placement_group_config(cfg.engine, device),
            # A failing row (e.g. a prompt over max_model_len) must not kill 260k labels: it becomes
            # `unparsed` with its error recorded.
            should_continue_on_error=True)
        proc = build_processor(pcfg, preprocess=partial(_vllm_preprocess, template=template,
                                                        max_doc_chars=cfg.max_doc_chars, max_tokens=cfg.max_tokens),
                               postprocess=_vllm_postprocess)
    else:
        from ray.data.llm import HttpRequestProcessorConfig

        h = cfg.http
        assert h is not None
        headers = {}
        if h.api_key_env and os.environ.get(h.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[h.api_key_env]}"
        pcfg = HttpRequestProcessorConfig(url=h.base_url.rstrip("/") + "/chat/completions", headers=headers,
                                          batch_size=cfg.batch_size, concurrency=h.concurrency, qps=h.qps,
                                          max_retries=h.max_retries)
        proc = build_processor(pcfg, preprocess=partial(_http_preprocess, template=template,
                                                        max_doc_chars=cfg.max_doc_chars, max_tokens=cfg.max_tokens,
                                                        model=h.model, choice_field=h.choice_field),
                               postprocess=_http_postprocess)
    return proc


def model_id(cfg: AnnotateConfig) -> str:
    return cfg.model if cfg.backend == "vllm" else f"{cfg.http.base_url}#{cfg.http.model}"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------- shards


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def finalize_shard(inputs: "pd.DataFrame", answers: "pd.DataFrame", model: str, version: str,
                   sha: str) -> "pd.DataFrame":
    """Rows in the input's order with parsed labels. Inference errors count as unparsed."""
    import pandas as pd

    if answers["id"].duplicated().any() or set(answers["id"]) != set(inputs["id"]):
        raise RuntimeError("annotation output does not match its shard's documents one-to-one")
    a = answers.set_index("id").loc[inputs["id"]]
    err = a["error"] if "error" in a.columns else pd.Series([None] * len(a), index=a.index)
    if "__inference_error__" in a.columns:  # rows that bypassed postprocess
        err = err.where(err.notna(), a["__inference_error__"].where(a["__inference_error__"].astype(bool), None))
    raw = a["raw_answer"] if "raw_answer" in a.columns else pd.Series([None] * len(a), index=a.index)
    return pd.DataFrame({
        "id": inputs["id"].astype(str).to_numpy(),
        "label": [UNPARSED if isinstance(e, str) and e else parse_answer(r) for r, e in zip(raw, err)],
        "raw_answer": [r if isinstance(r, str) else None for r in raw],
        "error": [e if isinstance(e, str) and e else None for e in err],
        "model": model, "prompt_version": version, "prompt_sha": sha,
        "shard": inputs["shard"].astype("int64").to_numpy(),
    }, columns=list(ANNOTATION_COLUMNS))


def parts_dir(ann_dir: Path, i: int) -> Path:
    """Where a shard's labels land batch by batch until the shard is whole: a killed run keeps them."""
    return ann_dir / f"shard-{i:05d}.parts"


def check_resumable(ann_dir: Path, model: str, prompt_sha: str, output_dir: str) -> None:
    """Labels from another annotator or prompt, in any finished shard or any shard's parts, must not be mixed
    into this run's labels."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(ann_dir.glob("shard-*.parquet")) + sorted(ann_dir.glob("shard-*.parts/*.parquet"))
    for p in files:
        t = pq.read_table(p, columns=["model", "prompt_sha"])
        for col, want in (("model", model), ("prompt_sha", prompt_sha)):
            other = pc.unique(t.column(col)).to_pylist()
            if other and other != [want]:
                from definemed.config import ConfigError

                found = next(v for v in other if v != want)
                raise ConfigError(f"invalid config field 'output_dir': {output_dir} holds labels in {p.name} by "
                                  f"another {col.replace('_', ' ')} ({found}); choose a new output_dir")


def pending_shards(sample_dir: Path, ann_dir: Path) -> list[int]:
    done = {p.name for p in ann_dir.glob("shard-*.parquet")}
    return [int(p.stem.split("-")[1]) for p in sorted(sample_dir.glob("shard-*.parquet")) if p.name not in done]


def _drop_ids(batch: "pd.DataFrame", ids: frozenset) -> "pd.DataFrame":
    return batch[~batch["id"].isin(ids)]


def annotate_shards(sample_dir: Path, ann_dir: Path, labeler: Callable, model: str, prompt_version: str,
                    max_shards: int | None = None) -> dict[str, int]:
    """Label every pending shard. Each batch of answers is written at once to its shard's parts directory; a
    shard's file appears (atomically) once all its rows are labelled, and its parts are then removed. A rerun
    skips finished shards and sends only the rows without an answer in the parts to the labeler.

    `max_shards` stops after that many shards (smoke runs).
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data
    from tqdm import tqdm

    from definemed.io import write_parquet_atomic

    ann_dir.mkdir(parents=True, exist_ok=True)
    todo = pending_shards(sample_dir, ann_dir)
    stats = {"skipped_shards": len(list(ann_dir.glob("shard-*.parquet"))), "labelled_shards": 0,
             "resumed_rows": 0}
    if not todo:
        return stats
    _, sha = load_prompt(prompt_version)
    files = [str(sample_dir / shard_name(i)) for i in todo]
    inputs = {i: pq.read_table(f, columns=["id", "shard"]).to_pandas() for i, f in zip(todo, files)}
    buffers: dict[int, list[pd.DataFrame]] = {i: [] for i in todo}
    for i in todo:  # answers a killed run already saved
        for p in sorted(parts_dir(ann_dir, i).glob("*.parquet")):
            buffers[i].append(pd.read_parquet(p).drop(columns=["model", "prompt_sha"]))
    have = {i: sum(len(b) for b in buffers[i]) for i in todo}
    stats["resumed_rows"] = sum(have.values())

    def finish(shard: int) -> None:
        df = finalize_shard(inputs[shard], pd.concat(buffers.pop(shard), ignore_index=True), model,
                            prompt_version, sha)
        write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), ann_dir / shard_name(shard))
        shutil.rmtree(parts_dir(ann_dir, shard), ignore_errors=True)
        stats["labelled_shards"] += 1

    for i in [i for i in todo if have[i] == len(inputs[i])]:  # killed between its last part and its file
        finish(i)
    bar = tqdm(total=sum(len(v) for v in inputs.values()), initial=stats["resumed_rows"], desc="annotate",
               unit="doc")
    if buffers:
        ds = ray.data.read_parquet([str(sample_dir / shard_name(i)) for i in buffers]).select_columns(
            ["id", "shard", "text"])
        done_ids = frozenset(str(x) for b in buffers.values() for part in b for x in part["id"])
        if done_ids:
            ds = ds.map_batches(_drop_ids, batch_format="pandas", fn_kwargs={"ids": done_ids})
        for batch in labeler(ds).iter_batches(batch_format="pandas", batch_size=None):
            bar.update(len(batch))
            for shard, g in batch.groupby("shard"):
                shard = int(shard)
                g = g.reset_index(drop=True)
                part = pa.Table.from_pandas(g.assign(model=model, prompt_sha=sha), preserve_index=False)
                write_parquet_atomic(part, parts_dir(ann_dir, shard) / f"part-{have[shard]:07d}.parquet")
                buffers[shard].append(g)
                have[shard] += len(g)
                if have[shard] == len(inputs[shard]):
                    finish(shard)
                    if max_shards is not None and stats["labelled_shards"] >= max_shards:
                        bar.close()
                        return stats
    bar.close()
    missing = [i for i in todo if i in buffers]
    if missing:
        raise RuntimeError(f"annotation ended with shards {missing} incomplete; re-run to resume them")
    return stats


def combine(ann_dir: Path) -> "pd.DataFrame":
    import pandas as pd

    parts = [pd.read_parquet(p) for p in sorted(ann_dir.glob("shard-*.parquet"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(ANNOTATION_COLUMNS))
