"""`cpt` stage: continual pre-training of an instruct model on packed FineMed-de sequences, on Ray Train.

The train loop is short on purpose (torchtitan style) and shared with `distill` (definemed/train/loop.py), as is
the driver side (definemed/train/trainer.py). One optimizer step = grad_accum micro-batches of ONE packed sequence
per worker; the loss is normalised by the target tokens of the whole global batch, so every target token weighs
the same however the documents were packed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from definemed.models.registry import ModelRef
from definemed.train.config import (CheckpointConfig, FaultInjection, MetricsConfig, OptimConfig, PackedTrainingConfig,
                                    ParallelConfig, TrainConfig)
from definemed.train.trainer import scaling_config

log = logging.getLogger(__name__)

HF_MODEL_DIR = "hf_model"
RUN_NAME = "cpt"

__all__ = ["CptConfig", "ParallelConfig", "OptimConfig", "TrainConfig", "CheckpointConfig", "MetricsConfig",
           "FaultInjection", "scaling_config", "build_trainer", "train_loop_per_worker", "run"]


class CptConfig(PackedTrainingConfig):
    model: ModelRef  # base instruct model: tiny://qwen2, /models/Qwen2.5-7B-Instruct, ...


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    from definemed.train.loop import build_model, run_steps, setup_worker

    w = setup_worker(loop)
    model, mesh, info = build_model(w, loop["model_path"])
    run_steps(w, model, mesh, info)


def build_trainer(cfg: CptConfig, model_path: str):
    from definemed.train import trainer

    loop = {"tag": "cpt", "model_path": model_path, "model_ref": cfg.model}
    return trainer.build_trainer(cfg, train_loop_per_worker, loop, RUN_NAME, Path(cfg.output_dir))


def run(cfg: CptConfig) -> dict[str, str]:
    from definemed.io import atomic_write_json
    from definemed.models import is_meaningless_model, resolve_model
    from definemed.train.export import export_hf
    from definemed.train.metrics import BATCHES_FILE, LOSS_PNG, METRICS_CSV, METRICS_FILE
    from definemed.train.trainer import check_pack_tokenizer, check_packed, fit, ran_with, run_summary, \
        write_metrics

    stats = check_packed(cfg)
    model_path = resolve_model(cfg.model)
    check_pack_tokenizer(stats, cfg.packed, model_path, cfg.model)
    out = Path(cfg.output_dir).resolve()
    print(f"[cpt] {cfg.model}: {cfg.parallel.num_workers} workers, mesh (replicate x shard) = "
          f"{cfg.parallel.mesh_label()}, grad_accum {cfg.grad_accum()}, "
          f"{cfg.train.max_steps} steps of {cfg.train.global_batch_tokens} tokens; "
          f"{stats['sequences']} packed sequences available", flush=True)
    ckpt_dir, state = fit(cfg, build_trainer(cfg, model_path), out, RUN_NAME, desc="cpt")

    tiny = " (tiny random model: the numbers prove the code path only)" if is_meaningless_model(cfg.model) else ""
    rows = write_metrics(out, f"CPT {cfg.model}{tiny}")
    hf_dir = export_hf(ckpt_dir, model_path, out / HF_MODEL_DIR, cfg.export_dtype, cfg,
                       lineage_inputs={"base_model": model_path, "packed": cfg.packed},
                       extra={"step": state["step"], "final_loss": rows[-1]["loss"] if rows else None,
                              **ran_with(state)})
    summary = {**run_summary(rows, state, ckpt_dir), "padding_fraction": stats["padding_fraction"]}
    atomic_write_json(out / "summary.json", summary)
    return {"hf_model": str(hf_dir), "checkpoint": str(ckpt_dir), "metrics_csv": str(out / METRICS_CSV),
            "metrics_jsonl": str(out / METRICS_FILE), "batches": str(out / BATCHES_FILE),
            "loss_curve": str(out / LOSS_PNG), "summary": str(out / "summary.json")}
