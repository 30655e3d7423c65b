"""`cpt` stage: continual pre-training of an instruct model on packed FineMed-de sequences, on Ray Train.

The train loop is short on purpose (torchtitan style); everything else lives in its own module. One optimizer
step = grad_accum micro-batches of ONE packed sequence per worker; the loss is normalised by the target tokens of
the whole global batch, so every target token weighs the same however the documents were packed.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from definemed.config import ConfigError, InputPath, StageConfig, StrictModel

log = logging.getLogger(__name__)

HF_MODEL_DIR = "hf_model"
RUN_NAME = "cpt"


class ParallelConfig(StrictModel):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    accelerator_type: str | None = None  # e.g. "A100" (Ray's accelerator_type resource)
    cpus_per_worker: float = Field(1.0, gt=0)
    # Workers per FSDP shard group; None = all workers (pure FSDP). 1 = pure replication. 8 = HSDP per node.
    shard_group_size: int | None = Field(None, ge=1)
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"

    @field_validator("shard_group_size")
    @classmethod
    def _divides(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("num_workers")
        if v is not None and n and n % v:
            raise ValueError(f"must divide parallel.num_workers ({n})")
        return v


class OptimConfig(StrictModel):
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)


class TrainConfig(StrictModel):
    seq_len: int = Field(4096, ge=8)  # must equal the pack stage's seq_len (checked at start)
    global_batch_tokens: int = Field(..., ge=8)  # micro batch 1 x grad_accum x workers x seq_len
    max_steps: int = Field(..., ge=1)
    seed: int = 0


class CheckpointConfig(StrictModel):
    every_steps: int = Field(100, ge=1)
    keep: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=-1)  # worker-failure restarts from the last checkpoint (-1: unlimited)


class MetricsConfig(StrictModel):
    # Dense fp32 peak of ONE worker's CPU share, an estimate (1 core with AVX2 FMA ~ 0.05-0.1 TFLOP/s):
    # CPU MFU is indicative only. GPUs use the vendor's dense bf16 peak unless gpu_peak_tflops is set.
    cpu_peak_tflops: float = Field(0.1, gt=0)
    gpu_peak_tflops: float | None = Field(None, gt=0)


class FaultInjection(StrictModel):
    """Test-only: worker `rank` exits hard at the start of `step` unless `marker` exists (it creates it first),
    i.e. on the first attempt only."""

    rank: int = Field(1, ge=0)
    step: int = Field(..., ge=1)
    marker: str


class CptConfig(StageConfig):
    model: str  # base instruct model: tiny://qwen2, /models/Qwen2.5-7B-Instruct, ...
    packed: InputPath  # the pack stage's output_dir
    parallel: ParallelConfig = ParallelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    export_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    fault_injection: FaultInjection | None = None

    @field_validator("train")
    @classmethod
    def _batch_divides(cls, v: TrainConfig, info: ValidationInfo) -> TrainConfig:
        par = info.data.get("parallel")
        if par is not None:
            per_step = v.seq_len * par.num_workers
            if v.global_batch_tokens % per_step:
                raise ValueError(f"global_batch_tokens ({v.global_batch_tokens}) must be a multiple of seq_len x "
                                 f"parallel.num_workers ({per_step}) with micro batch 1")
        return v

    def grad_accum(self) -> int:
        return self.train.global_batch_tokens // (self.train.seq_len * self.parallel.num_workers)


# ----------------------------------------------------------------------------------------------------------------
# the train loop (runs in every Ray Train worker)


def _attn_implementation(choice: str, device_type: str) -> str:
    if choice != "auto":
        return choice
    if device_type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"  # varlen kernel: packed documents without a dense mask
        except ImportError:
            pass
    return "sdpa"


def _scalar(t) -> float:
    from torch.distributed.tensor import DTensor

    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    import json

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from definemed.train.checkpoint import load_sharded, report_with_checkpoint, resume_dir
    from definemed.train.dataloader import PackedDataLoader
    from definemed.train.loss import count_targets, forward_logits, loss_sum
    from definemed.train.lr_scheduler import build_lr_scheduler
    from definemed.train.metrics import (BATCHES_FILE, METRICS_FILE, MetricsLog, device_peak_flops,
                                         flops_per_token, step_metrics)
    from definemed.train.parallelize import build_mesh, parallelize

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not one "Reporting training result" line per step
    cfg: CptConfig = loop["cfg"]
    out = Path(loop["output_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    mesh = build_mesh(device.type, world, cfg.parallel.shard_group_size)
    model = AutoModelForCausalLM.from_pretrained(
        loop["model_path"], dtype=torch.float32,  # fp32 master weights; bf16 compute comes from the FSDP policy
        attn_implementation=_attn_implementation(cfg.parallel.attn_implementation, device.type))
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    flops_tok = flops_per_token(model.config, n_params, n_embed, cfg.train.seq_len)
    peak = device_peak_flops(device.type, cfg.metrics.cpu_peak_tflops, cfg.metrics.gpu_peak_tflops)
    parallelize(model, mesh, cfg.parallel.mixed_precision, cfg.parallel.activation_checkpointing)
    model.train()

    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scheduler = build_lr_scheduler(optimizer, o.warmup_steps, cfg.train.max_steps, o.min_lr_ratio)
    loader = PackedDataLoader(loop["shards"], dp_rank=rank, dp_world=world, grad_accum=cfg.grad_accum(),
                              seed=cfg.train.seed)

    start, resumed_from = 0, None
    # Rank 0 picks the resume point and everyone loads that same one.
    pick = [str(resume_dir(ray.train.get_checkpoint(), loop["run_dir"]) or "") if rank == 0 else None]
    dist.broadcast_object_list(pick, src=0)
    if pick[0]:
        state = load_sharded(pick[0], model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        start = loader.check_resume(state["data"])
        resumed_from = state["step"]
        if rank == 0:
            print(f"[cpt] resumed from checkpoint at step {resumed_from} ({pick[0]})", flush=True)
    mlog = MetricsLog(out / METRICS_FILE, start) if rank == 0 else None

    hsdp = mesh.mesh.shape[0] > 1
    fi = cfg.fault_injection
    tokens_step = world * cfg.grad_accum() * cfg.train.seq_len
    bar = tqdm(total=cfg.train.max_steps, initial=start, desc="cpt", unit="step", disable=rank != 0)
    for step in range(start, cfg.train.max_steps):
        n = step + 1  # 1-based optimizer step, as reported
        if fi is not None and rank == fi.rank and n == fi.step and not os.path.exists(fi.marker):
            Path(fi.marker).write_text(f"worker {rank} killed at step {n}\n")
            os._exit(1)  # a hard crash, not an exception: the worker process is gone
        t0 = time.perf_counter()
        micro = loader.step_batches(step)
        n_targets = torch.tensor(float(sum(count_targets(mb.labels) for mb in micro)), device=device)
        dist.all_reduce(n_targets)
        loss_acc = torch.zeros((), device=device)
        for m, mb in enumerate(micro):
            if hsdp:  # reduce-scatter every micro-batch, all-reduce across replicas once per step
                model.set_requires_all_reduce(m == len(micro) - 1)
            logits = forward_logits(model, mb.input_ids.to(device), mb.position_ids.to(device))
            ls, _ = loss_sum(logits, mb.labels.to(device))
            # FSDP averages gradients over the `world` replicas: scale so the result is sum / global targets.
            (ls * world / n_targets).backward()
            loss_acc += ls.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]  # the lr this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_acc)
        seq_ids: list[list[int]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(seq_ids, [mb.seq_id for mb in micro])
        dt = time.perf_counter() - t0

        metrics = step_metrics(step=n, loss=float(loss_acc / n_targets), lr=lr,
                               grad_norm=_scalar(grad_norm), step_time_s=dt, tokens_step=tokens_step,
                               target_tokens_step=int(n_targets), world_size=world, flops_token=flops_tok,
                               peak_flops=peak)
        if rank == 0:
            mlog.write(metrics)
            with (out / BATCHES_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": n, "seq_ids": seq_ids, "loss": metrics["loss"],
                                    "resumed_from": resumed_from}) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
        if n % cfg.checkpoint.every_steps == 0 or n == cfg.train.max_steps:
            train_state = None
            if rank == 0:
                train_state = {"step": n, "scheduler": scheduler.state_dict(), "data": loader.state_dict(n),
                               "mesh": list(mesh.mesh.shape), "model": cfg.model}
            report_with_checkpoint(metrics, n, model, optimizer, train_state)
        else:
            ray.train.report(metrics)
    bar.close()


# ----------------------------------------------------------------------------------------------------------------
# the stage (driver)


def _check_packed(cfg: CptConfig) -> dict[str, Any]:
    from definemed.train.pack import SHARDS_DIR, read_stats

    try:
        stats = read_stats(cfg.packed)
    except FileNotFoundError:
        raise ConfigError(f"invalid config field 'packed': {cfg.packed} is not a pack stage output "
                          "(no stats.json)") from None
    if stats["seq_len"] != cfg.train.seq_len:
        raise ConfigError(f"invalid config field 'train.seq_len': {cfg.train.seq_len} but {cfg.packed} was packed "
                          f"with seq_len {stats['seq_len']}")
    if not (Path(cfg.packed) / SHARDS_DIR).is_dir():
        raise ConfigError(f"invalid config field 'packed': {cfg.packed}/{SHARDS_DIR} missing")
    return stats


def _check_tokenizer(stats: dict[str, Any], model_path: str, cfg: CptConfig) -> None:
    """Token ids only mean something to the tokenizer that made them: refuse a pack from another vocabulary."""
    from definemed.train.pack import load_tokenizer

    if Path(stats["tokenizer"]).resolve() == Path(model_path).resolve():
        return
    try:
        same = load_tokenizer(stats["tokenizer"]).get_vocab() == load_tokenizer(model_path).get_vocab()
    except (OSError, ValueError):
        same = False
    if not same:
        raise ConfigError(f"invalid config field 'packed': {cfg.packed} was tokenized for {stats['model']} "
                          f"({stats['tokenizer']}), whose vocabulary differs from model {cfg.model}")


def build_trainer(cfg: CptConfig, model_path: str):
    from ray.train import CheckpointConfig as RayCheckpointConfig
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from definemed.train.pack import SHARDS_DIR

    out = Path(cfg.output_dir).resolve()  # workers may not share the driver's cwd
    p = cfg.parallel
    resources = {"CPU": p.cpus_per_worker}
    scaling = ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu, resources_per_worker=resources,
                            accelerator_type=p.accelerator_type)
    run_config = RunConfig(
        name=RUN_NAME, storage_path=str(out / "ray"),  # same name + storage: a restarted job resumes
        failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
        checkpoint_config=RayCheckpointConfig(num_to_keep=cfg.checkpoint.keep))
    loop = {"cfg": cfg, "model_path": model_path, "output_dir": str(out),
            "run_dir": str(out / "ray" / RUN_NAME),
            "shards": str((Path(cfg.packed) / SHARDS_DIR).resolve())}
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop, scaling_config=scaling,
                        run_config=run_config)


def run(cfg: CptConfig) -> dict[str, str]:
    from definemed.io import atomic_write_json
    from definemed.models import is_meaningless_model, resolve_model
    from definemed.train.checkpoint import latest_checkpoint_dir, read_train_state
    from definemed.train.export import export_hf
    from definemed.train.metrics import BATCHES_FILE, LOSS_PNG, METRICS_CSV, METRICS_FILE, plot_loss_curve, \
        read_jsonl, write_csv

    stats = _check_packed(cfg)
    model_path = resolve_model(cfg.model)
    _check_tokenizer(stats, model_path, cfg)
    out = Path(cfg.output_dir).resolve()
    print(f"[cpt] {cfg.model}: {cfg.parallel.num_workers} workers, mesh (replicate x shard) = "
          f"{cfg.parallel.num_workers // (cfg.parallel.shard_group_size or cfg.parallel.num_workers)} x "
          f"{cfg.parallel.shard_group_size or cfg.parallel.num_workers}, grad_accum {cfg.grad_accum()}, "
          f"{cfg.train.max_steps} steps of {cfg.train.global_batch_tokens} tokens; "
          f"{stats['sequences']} packed sequences available", flush=True)
    build_trainer(cfg, model_path).fit()

    ckpt_dir = latest_checkpoint_dir(out / "ray" / RUN_NAME)
    if ckpt_dir is None:
        raise RuntimeError(f"training finished without a checkpoint under {out / 'ray' / RUN_NAME}")
    state = read_train_state(ckpt_dir)
    if state["step"] != cfg.train.max_steps:
        raise RuntimeError(f"latest checkpoint is step {state['step']}, expected {cfg.train.max_steps}")

    rows = read_jsonl(out / METRICS_FILE)
    write_csv(rows, out / METRICS_CSV)
    tiny = " (tiny random model: the numbers prove the code path only)" if is_meaningless_model(cfg.model) else ""
    plot_loss_curve(rows, out / LOSS_PNG, f"CPT {cfg.model}{tiny}")
    hf_dir = export_hf(ckpt_dir, model_path, out / HF_MODEL_DIR, cfg.export_dtype, cfg,
                       lineage_inputs={"base_model": model_path, "packed": cfg.packed},
                       extra={"step": state["step"], "final_loss": rows[-1]["loss"] if rows else None})
    summary = {
        "steps": state["step"],
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in rows[1:] or rows) / max(1, len(rows[1:] or rows)),
        "mean_mfu": sum(r["mfu"] for r in rows[1:] or rows) / max(1, len(rows[1:] or rows)),
        "mfu_note": "CPU peak is an estimate (metrics.cpu_peak_tflops)" if not cfg.parallel.use_gpu else
                    "GPU dense bf16 peak",
        "checkpoint": str(ckpt_dir),
        "padding_fraction": stats["padding_fraction"],
    }
    atomic_write_json(out / "summary.json", summary)
    return {"hf_model": str(hf_dir), "checkpoint": str(ckpt_dir), "metrics_csv": str(out / METRICS_CSV),
            "metrics_jsonl": str(out / METRICS_FILE), "batches": str(out / BATCHES_FILE),
            "loss_curve": str(out / LOSS_PNG), "summary": str(out / "summary.json")}
