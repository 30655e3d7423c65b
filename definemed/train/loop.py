"""The train loop every training stage runs in its Ray Train workers (cpt, distill), one step per function.

A stage's worker function sets up (`setup_worker`), builds its trained model (`build_model`) and anything else it
needs (distill: a frozen teacher), then hands `run_steps` a `micro_loss` (None: the packed next-token CE of CPT).
Everything else is the same for every stage: AdamW + warmup/cosine, the deterministic packed loader, resume from
the newest complete DCP checkpoint, fault injection, metrics and checkpoints as Ray Train reports.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """This worker's place in the job. `loop` is the train_loop_config the driver built: it always holds `cfg`
    (the stage config), `tag` (log prefix), `output_dir`, `run_dir` (Ray Train run folder), `shards` and
    `model_ref` (what the checkpoints record as the trained model)."""

    cfg: Any
    loop: dict[str, Any]
    rank: int
    world: int
    device: Any  # torch.device
    out: Path

    @property
    def tag(self) -> str:
        return self.loop.get("tag", "train")


def setup_worker(loop: dict[str, Any]) -> Worker:
    import ray.train
    import ray.train.torch
    import torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not one "Reporting training result" line per step
    cfg = loop["cfg"]
    ctx = ray.train.get_context()
    torch.manual_seed(cfg.train.seed)
    return Worker(cfg, loop, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                  Path(loop["output_dir"]))


def build_model(w: Worker, model_path: str):
    """The trained model, read once by rank 0, sharded over the (replicate, shard) mesh; its FLOPs per token."""
    from definemed.train.metrics import flops_per_token
    from definemed.train.parallelize import build_mesh
    from definemed.train.weights import load_base_model

    mesh = build_mesh(w.device.type, w.world, w.cfg.parallel.shard_group_size)
    model, info = load_base_model(model_path, mesh, w.device, w.rank, w.cfg.parallel)
    n_params = sum(p.numel() for p in model.parameters())  # DTensor numel is the global one
    n_embed = model.get_input_embeddings().weight.numel()
    info["flops_per_token"] = flops_per_token(model.config, n_params, n_embed, w.cfg.train.seq_len)
    info["mesh"] = list(mesh.mesh.shape)
    info["device"] = w.device.type
    if w.rank == 0:
        att = info["attention"]
        print(f"[{w.tag}] weights read once by rank 0 and broadcast into {w.world} shards; mesh {info['mesh']} on "
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
        print(f"[{w.tag}] resumed from checkpoint at step {state['step']} (mesh {state.get('mesh')}; now "
              f"{w.cfg.parallel.mesh_label()}) ({pick[0]})", flush=True)
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
    if fi is not None and w.loop.get("fault_injection", True) and w.rank == fi.rank and n == fi.step \
            and not os.path.exists(fi.marker):
        Path(fi.marker).write_text(f"worker {w.rank} killed at step {n}\n")
        os._exit(1)  # a hard crash, not an exception: the worker process is gone


def log_step(w: Worker, n: int, metrics: dict[str, Any], seq_ids, resumed_from, extra: dict[str, Any], mlog):
    import json

    from definemed.train.metrics import BATCHES_FILE

    mlog.write(metrics)
    with (w.out / BATCHES_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": n, "seq_ids": seq_ids, "loss": metrics["loss"], "resumed_from": resumed_from,
                            **extra}) + "\n")


def mixed_precision_used(mode: str, device_type: str) -> str:
    from definemed.train.parallelize import uses_bf16

    return "bf16 params/compute, fp32 reduce" if uses_bf16(mode, device_type) else "fp32"


def run_steps(w: Worker, model, mesh, info: dict[str, Any], micro_loss: Callable | None = None,
              state_extra: dict[str, Any] | None = None) -> None:
    """Optimizer, loader, resume, then the steps to `train.max_steps` with metrics and checkpoints.

    `micro_loss(model, micro_batch, device) -> (summed loss, {part: summed value})` replaces the next-token CE;
    its parts are logged per target token beside `loss`. `state_extra` goes into every checkpoint's train state."""
    import time

    import ray.train
    import torch.distributed as dist

    from definemed.train.checkpoint import report_with_checkpoint
    from definemed.train.config import grad_accum
    from definemed.train.dataloader import PackedDataLoader
    from definemed.train.metrics import METRICS_FILE, MetricsLog, device_peak_flops, step_metrics
    from definemed.train.step import train_step

    cfg = w.cfg
    accum = grad_accum(cfg)
    optimizer, scheduler = build_optimizer(w, model)
    loader = PackedDataLoader(w.loop["shards"], dp_rank=w.rank, dp_world=w.world, grad_accum=accum,
                              seed=cfg.train.seed)
    start, resumed_from = resume(w, model, optimizer, scheduler, loader)
    peak = device_peak_flops(w.device.type, cfg.metrics.cpu_peak_tflops, cfg.metrics.gpu_peak_tflops)
    replica_all_reduces = count_replica_all_reduces(model, mesh)
    mlog = MetricsLog(w.out / METRICS_FILE, start) if w.rank == 0 else None
    tokens_step = w.world * accum * cfg.train.seq_len
    for step in range(start, cfg.train.max_steps):
        n = step + 1  # 1-based optimizer step, as reported
        maybe_inject_fault(w, n)
        t0 = time.perf_counter()
        micro = loader.step_batches(step)
        before = replica_all_reduces[0] if replica_all_reduces else 0
        res = train_step(model, optimizer, scheduler, micro, device=w.device, world=w.world,
                         max_grad_norm=cfg.optim.max_grad_norm, hsdp=replica_all_reduces is not None,
                         micro_loss=micro_loss)
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
                               "mesh": info["mesh"], "model": w.loop["model_ref"], "device": info["device"],
                               "attention": info["attention"],
                               "mixed_precision": mixed_precision_used(cfg.parallel.mixed_precision, w.device.type),
                               **(state_extra or {})}
            report_with_checkpoint(metrics, n, model, optimizer, train_state)
        else:
            ray.train.report(metrics)
