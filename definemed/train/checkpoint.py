"""Sharded checkpoints with torch.distributed.checkpoint (DCP), persisted as Ray Train checkpoints.

Every worker writes its own shard files into a local temporary directory and reports it with
`ray.train.report(..., checkpoint=...)`; Ray merges the workers' directories into one checkpoint directory in
run storage (`<output_dir>/ray/cpt/checkpoint_<step>`). Rank 0 adds `train_state.json`: step, scheduler state and
data position. `ray.train.get_checkpoint()` hands the latest one back after a worker failure or a restarted job.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TRAIN_STATE = "train_state.json"


def save_sharded(path: str | os.PathLike, model, optimizer, train_state: dict[str, Any] | None) -> None:
    """Collective: every rank calls it. Model and optimizer stay sharded (no gather to one rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(str(path)))
    if train_state is not None:
        from definemed.io import atomic_write_json

        atomic_write_json(Path(path) / TRAIN_STATE, train_state)


def load_sharded(path: str | os.PathLike, model, optimizer) -> dict[str, Any]:
    """Collective: loads this rank's shards (resharding if the mesh changed) and returns the train state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_train_state(path)


def read_train_state(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / TRAIN_STATE
    if not p.exists():
        raise FileNotFoundError(f"{path} is not a complete cpt checkpoint (no {TRAIN_STATE})")
    return json.loads(p.read_text(encoding="utf-8"))


def report_with_checkpoint(metrics: dict[str, Any], step: int, model, optimizer,
                           train_state: dict[str, Any] | None) -> None:
    """Save this rank's shard locally and report it; Ray uploads and merges, then the temp dir goes away."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"cpt-ckpt-{step}-") as tmp:
        save_sharded(tmp, model, optimizer, train_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")


def is_complete(path: str | os.PathLike) -> bool:
    """Every shard file the DCP metadata points at is there, whole, and so is the train state."""
    import torch.distributed.checkpoint as dcp

    p = Path(path)
    if not (p / ".metadata").exists() or not (p / TRAIN_STATE).exists():
        return False
    try:
        meta = dcp.FileSystemReader(str(p)).read_metadata()
    except Exception:  # noqa: BLE001 - a torn .metadata is simply incomplete
        return False
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return all((p / f).exists() and (p / f).stat().st_size >= size for f, size in need.items())


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(read_train_state(path)["step"])


def latest_checkpoint_dir(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in a Ray Train run folder (export, and resume when Ray lost track)."""
    found = [p for p in Path(run_dir).glob("checkpoint_*") if is_complete(p)]
    return max(found, key=checkpoint_step) if found else None


def resume_dir(ray_checkpoint, run_dir: str | os.PathLike) -> Path | None:
    """Where to resume from: Ray's latest registered checkpoint, or a newer complete one already persisted.

    Ray registers a checkpoint only after its controller has collected every worker's report; when a worker dies
    while reports are still queued (seen under heavy load), the restarted group would otherwise fall back to an
    older checkpoint or none at all, and repeat steps. Shards are uploaded before the report barrier, so a
    complete directory on storage is a safe resume point.
    """
    candidates = []
    if ray_checkpoint is not None:
        candidates.append(Path(ray_checkpoint.path))
    disk = latest_checkpoint_dir(run_dir)
    if disk is not None:
        candidates.append(disk)
    candidates = [c for c in candidates if c.exists() and is_complete(c)]
    return max(candidates, key=checkpoint_step) if candidates else None
