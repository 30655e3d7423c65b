"""`cpt` stage: continual pre-training of an instruct model on packed FineMed-de sequences, on Ray Train.

The train loop is short on purpose (torchtitan style); everything else lives in its own module. One optimizer
step = grad_accum micro-batches of ONE packed sequence per worker; the loss is normalised by the target tokens of
the whole global batch, so every target token weighs the same however the documents were packed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from definemed.config import ConfigError, InputPath, StageConfig, StrictModel
from definemed.models.registry import ModelRef

log = logging.getLogger(__name__)

HF_MODEL_DIR = "hf_model"
RUN_NAME = "cpt"


class ParallelConfig(StrictModel):
    num_workers: int = Field(2, ge=1)
    # auto: GPU workers if the Ray cluster has GPUs (definemed.resources); cluster configs say true
    use_gpu: bool | Literal["auto"] = "auto"
    accelerator_type: str | None = None  # e.g. "A100" (Ray's accelerator_type resource; GPU workers only)
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
    model: ModelRef  # base instruct model: tiny://qwen2, /models/Qwen2.5-7B-Instruct, ...
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
# the train loop (runs in every Ray Train worker), one step per function


@dataclass
class Worker:
    """This worker's place in the job."""

    cfg: CptConfig
    loop: dict[str, Any]
    rank: int
    world: int
    device: Any  # torch.device
    out: Path


def setup_worker(loop: dict[str, Any]) -> Worker:
    import ray.train
    import ray.train.torch
    import torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not one "Reporting training result" line per step
    cfg: CptConfig = loop["cfg"]
    ctx = ray.train.get_context()
    torch.manual_seed(cfg.train.seed)
    return Worker(cfg, loop, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                  Path(loop["output_dir"]))


def build_model(w: Worker):
    """The base model, read once by rank 0, sharded over the (replicate, shard) mesh; its FLOPs per token."""
    from definemed.train.metrics import flops_per_token
    from definemed.train.parallelize import build_mesh
    from definemed.train.weights import load_base_model

    mesh = build_mesh(w.device.type, w.world, w.cfg.parallel.shard_group_size)
    model, info = load_base_model(w.loop["model_path"], mesh, w.device, w.rank, w.cfg.parallel)
    n_params = sum(p.numel() for p in model.parameters())  # DTensor numel is the global one
    n_embed = model.get_input_embeddings().weight.numel()
    info["flops_per_token"] = flops_per_token(model.config, n_params, n_embed, w.cfg.train.seq_len)
    info["mesh"] = list(mesh.mesh.shape)
    info["device"] = w.device.type
    if w.rank == 0:
        att = info["attention"]
        print(f"[cpt] weights read once by rank 0 and broadcast into {w.world} shards; mesh {info['mesh']} on "
              f"{w.device.type}; attention: {att['used']} ({att['why']})", flush=True)
    model.train()
    return model, mesh, info


def build_optimizer(w: Worker, model):
    import torch

    from definemed.train.lr_scheduler import build_lr_scheduler

    o = w.cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return optimizer, build_lr_scheduler(optimizer, o.warmup_steps, w.cfg.train.max_steps, o.min_lr_ratio)


def resume(w: Worker, model, optimizer, scheduler, loader) -> tuple[int, int | None]:
    """(first step to run, step resumed from). Rank 0 picks the checkpoint and everyone loads that same one; DCP
    reshards when the mesh changed (e.g. 2 x 2 -> 1 x 4)."""
    import ray.train
    import torch.distributed as dist

    from definemed.train.checkpoint import load_sharded, resume_dir

    pick = [str(resume_dir(ray.train.get_checkpoint(), w.loop["run_dir"]) or "") if w.rank == 0 else None]
    dist.broadcast_object_list(pick, src=0)
    if not pick[0]:
        return 0, None
    state = load_sharded(pick[0], model, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    if w.rank == 0:
        print(f"[cpt] resumed from checkpoint at step {state['step']} (mesh {state.get('mesh')}; now "
              f"{w.cfg.parallel.num_workers // (w.cfg.parallel.shard_group_size or w.cfg.parallel.num_workers)} x "
              f"{w.cfg.parallel.shard_group_size or w.cfg.parallel.num_workers}) ({pick[0]})", flush=True)
    return loader.check_resume(state["data"]), state["step"]


def count_replica_all_reduces(model, mesh) -> list[int] | None:
    """HSDP: a counter of the gradient all-reduces across replicas (FSDP2 calls the hook after each one)."""
    if mesh.mesh.shape[0] == 1:
        return None
    calls = [0]

    def hook(_reduced) -> None:
        calls[0] += 1

    model.set_all_reduce_hook(hook)  # the root's parameter group: one all-reduce per step when accumulation works
    return calls


def maybe_inject_fault(w: Worker, n: int) -> None:
    fi = w.cfg.fault_injection
    if fi is not None and w.rank == fi.rank and n == fi.step and not os.path.exists(fi.marker):
        Path(fi.marker).write_text(f"worker {w.rank} killed at step {n}\n")
        os._exit(1)  # a hard crash, not an exception: the worker process is gone


def log_step(w: Worker, n: int, metrics: dict[str, Any], seq_ids, resumed_from, extra: dict[str, Any], mlog):
    import json

    from definemed.train.metrics import BATCHES_FILE

    mlog.write(metrics)
    with (w.out / BATCHES_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": n, "seq_ids": seq_ids, "loss": metrics["loss"], "resumed_from": resumed_from,
                            **extra}) + "\n")


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    import time

    import ray.train
    import torch.distributed as dist

    from definemed.train.checkpoint import report_with_checkpoint
    from definemed.train.dataloader import PackedDataLoader
    from definemed.train.metrics import METRICS_FILE, MetricsLog, device_peak_flops, step_metrics
    from definemed.train.step import train_step

    w = setup_worker(loop)
    cfg = w.cfg
    model, mesh, info = build_model(w)
    optimizer, scheduler = build_optimizer(w, model)
    loader = PackedDataLoader(loop["shards"], dp_rank=w.rank, dp_world=w.world, grad_accum=cfg.grad_accum(),
                              seed=cfg.train.seed)
    start, resumed_from = resume(w, model, optimizer, scheduler, loader)
    peak = device_peak_flops(w.device.type, cfg.metrics.cpu_peak_tflops, cfg.metrics.gpu_peak_tflops)
    replica_all_reduces = count_replica_all_reduces(model, mesh)
    mlog = MetricsLog(w.out / METRICS_FILE, start) if w.rank == 0 else None
    tokens_step = w.world * cfg.grad_accum() * cfg.train.seq_len
    for step in range(start, cfg.train.max_steps):
        n = step + 1  # 1-based optimizer step, as reported
        maybe_inject_fault(w, n)
        t0 = time.perf_counter()
        micro = loader.step_batches(step)
        before = replica_all_reduces[0] if replica_all_reduces else 0
        res = train_step(model, optimizer, scheduler, micro, device=w.device, world=w.world,
                         max_grad_norm=cfg.optim.max_grad_norm, hsdp=replica_all_reduces is not None)
        seq_ids: list[list[int]] = [None] * w.world  # type: ignore[list-item]
        dist.all_gather_object(seq_ids, [mb.seq_id for mb in micro])
        metrics = step_metrics(step=n, step_time_s=time.perf_counter() - t0, tokens_step=tokens_step,
                               world_size=w.world, flops_token=info["flops_per_token"], peak_flops=peak, **res)
        extra = {"replica_all_reduces": replica_all_reduces[0] - before} if replica_all_reduces else {}
        if w.rank == 0:
            log_step(w, n, metrics, seq_ids, resumed_from, extra, mlog)
        if n % cfg.checkpoint.every_steps == 0 or n == cfg.train.max_steps:
            train_state = None
            if w.rank == 0:
                train_state = {"step": n, "scheduler": scheduler.state_dict(), "data": loader.state_dict(n),
                               "mesh": info["mesh"], "model": cfg.model, "device": info["device"],
                               "attention": info["attention"],
                               "mixed_precision": mixed_precision_used(cfg.parallel.mixed_precision, w.device.type)}
            report_with_checkpoint(metrics, n, model, optimizer, train_state)
        else:
            ray.train.report(metrics)


def mixed_precision_used(mode: str, device_type: str) -> str:
    from definemed.train.parallelize import uses_bf16

    return "bf16 params/compute, fp32 reduce" if uses_bf16(mode, device_type) else "fp32"


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


def scaling_config(cfg: CptConfig, resources: dict[str, float] | None = None):
    """Ray Train workers: GPU or CPU from `parallel.use_gpu` and the cluster (`resources`, default the connected
    one), never from the driver's hardware."""
    from ray.train import ScalingConfig

    from definemed.resources import resolve_device

    p = cfg.parallel
    gpu = resolve_device(p.use_gpu, resources) == "gpu"
    return ScalingConfig(num_workers=p.num_workers, use_gpu=gpu, resources_per_worker={"CPU": p.cpus_per_worker},
                         accelerator_type=p.accelerator_type if gpu else None)


def build_trainer(cfg: CptConfig, model_path: str):
    from ray.train import CheckpointConfig as RayCheckpointConfig
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from definemed.train.pack import SHARDS_DIR

    out = Path(cfg.output_dir).resolve()  # workers may not share the driver's cwd
    scaling = scaling_config(cfg)
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
    from definemed.train.metrics import BATCHES_FILE, LOSS_PNG, METRICS_CSV, METRICS_FILE, follow_progress, \
        plot_loss_curve, read_jsonl, write_csv

    stats = _check_packed(cfg)
    model_path = resolve_model(cfg.model)
    _check_tokenizer(stats, model_path, cfg)
    out = Path(cfg.output_dir).resolve()
    print(f"[cpt] {cfg.model}: {cfg.parallel.num_workers} workers, mesh (replicate x shard) = "
          f"{cfg.parallel.num_workers // (cfg.parallel.shard_group_size or cfg.parallel.num_workers)} x "
          f"{cfg.parallel.shard_group_size or cfg.parallel.num_workers}, grad_accum {cfg.grad_accum()}, "
          f"{cfg.train.max_steps} steps of {cfg.train.global_batch_tokens} tokens; "
          f"{stats['sequences']} packed sequences available", flush=True)
    with follow_progress(out / METRICS_FILE, cfg.train.max_steps):
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
    ran = {"device": state.get("device"), "mesh": state.get("mesh"), "attention": state.get("attention"),
           "mixed_precision": state.get("mixed_precision")}  # what the workers actually used
    hf_dir = export_hf(ckpt_dir, model_path, out / HF_MODEL_DIR, cfg.export_dtype, cfg,
                       lineage_inputs={"base_model": model_path, "packed": cfg.packed},
                       extra={"step": state["step"], "final_loss": rows[-1]["loss"] if rows else None, **ran})
    summary = {
        "steps": state["step"],
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in rows[1:] or rows) / max(1, len(rows[1:] or rows)),
        "mean_mfu": sum(r["mfu"] for r in rows[1:] or rows) / max(1, len(rows[1:] or rows)),
        "mfu_note": "GPU dense bf16 peak" if state.get("device") == "cuda" else
                    "CPU peak is an estimate (metrics.cpu_peak_tflops)",
        **ran,
        "checkpoint": str(ckpt_dir),
        "padding_fraction": stats["padding_fraction"],
    }
    atomic_write_json(out / "summary.json", summary)
    return {"hf_model": str(hf_dir), "checkpoint": str(ckpt_dir), "metrics_csv": str(out / METRICS_CSV),
            "metrics_jsonl": str(out / METRICS_FILE), "batches": str(out / BATCHES_FILE),
            "loss_curve": str(out / LOSS_PNG), "summary": str(out / "summary.json")}
