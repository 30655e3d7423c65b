"""The frozen teacher inside every distill worker: eval mode, no gradients, no optimizer state, held as memory
allows.

- `replicated`: every worker holds the whole teacher (fastest: no collectives in its forward);
- `sharded`: the teacher is `fully_shard`ed over the workers' mesh like the student but never trained: each
  worker holds its shards, FSDP2 all-gathers one block at a time in the forward and frees it after;
- `auto`: replicated when the teacher's weights take at most `teacher.replicate_below` of one worker's device
  memory (GPU: the device's total; CPU: the node's RAM divided by the workers on it), else sharded. Rank 0
  decides and broadcasts, so every rank holds the teacher the same way.

Either way rank 0 alone reads the checkpoint and broadcasts it (definemed/train/weights.py). The teacher is kept
in the compute dtype of the student's mixed-precision policy (bf16 on GPU, fp32 on CPU): it needs no fp32 master
weights.
"""
from __future__ import annotations

from typing import Any, Literal

import torch

Placement = Literal["auto", "replicated", "sharded"]


def worker_memory_bytes(device: torch.device, local_world_size: int) -> int:
    """Memory one worker may count on for its models."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(1, local_world_size))


def choose_placement(choice: Placement, teacher_bytes: int, worker_bytes: int, share: float) -> tuple[str, str]:
    """(placement, why)."""
    if choice != "auto":
        return choice, "set in teacher.placement"
    gib = 2 ** 30
    fits = teacher_bytes <= share * worker_bytes
    return ("replicated" if fits else "sharded",
            f"auto: teacher weights {teacher_bytes / gib:.2f} GiB {'<=' if fits else '>'} {share:.0%} of "
            f"{worker_bytes / gib:.1f} GiB per worker")


def reshard(model) -> None:
    """Free the unsharded weights FSDP2 keeps after a forward with no backward to follow (the root and the last
    block are not resharded after forward by default: training would all-gather them again for backward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def load_teacher(w, model_path: str, mesh) -> tuple[Any, dict[str, Any], Any]:
    """(frozen teacher, what was done, the callback to run after each teacher forward or None)."""
    import ray.train
    import torch.distributed as dist

    from definemed.distill.surgery import count_parameters
    from definemed.train.metrics import flops_per_token
    from definemed.train.parallelize import parallelize, uses_bf16
    from definemed.train.weights import broadcast_weights, build_on_meta, choose_attention, materialize, \
        read_full_state_dict

    par = w.cfg.parallel
    tcfg = w.cfg.teacher
    attn, _ = choose_attention(par.attn_implementation, w.device.type)
    dtype = torch.bfloat16 if uses_bf16(par.mixed_precision, w.device.type) else torch.float32
    model = build_on_meta(model_path, attn, dtype)
    n_params = count_parameters(model)
    n_bytes = n_params * torch.finfo(dtype).bits // 8
    pick: list[Any] = [None]
    if w.rank == 0:
        mem = worker_memory_bytes(w.device, ray.train.get_context().get_local_world_size())
        pick = [(*choose_placement(tcfg.placement, n_bytes, mem, tcfg.replicate_below), mem)]
    dist.broadcast_object_list(pick, src=0)
    placement, why, mem = pick[0]
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    if placement == "sharded":
        parallelize(model, mesh, par.mixed_precision, activation_checkpointing=False)
    materialize(model, w.device, buffers)
    full = read_full_state_dict(model_path) if w.rank == 0 else None
    if full is not None and dtype != torch.float32:
        full = {k: v.to(dtype) for k, v in full.items()}
    broadcast_weights(model, full)  # plain tensors for a replicated teacher, shards for a sharded one
    del full
    model.eval()
    model.requires_grad_(False)
    n_embed = model.get_input_embeddings().weight.numel()
    info = {"placement": placement, "why": why, "parameters": n_params, "weight_bytes": n_bytes,
            "worker_memory_bytes": mem, "dtype": str(dtype).replace("torch.", ""),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "training_mode": model.training,
            # a forward is a third of a training step's 6N + attention FLOPs
            "forward_flops_per_token": flops_per_token(model.config, n_params, n_embed, w.cfg.train.seq_len) / 3}
    if w.rank == 0:
        print(f"[{w.tag}] teacher {placement} ({why}), {n_params / 1e6:.1f}M parameters in {info['dtype']}, frozen",
              flush=True)
    return model, info, (reshard if placement == "sharded" else None)
