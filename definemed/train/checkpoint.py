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


def latest_checkpoint_dir(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory in a Ray Train run folder (for export and inspection)."""
    found = sorted(p for p in Path(run_dir).glob("checkpoint_*") if (p / TRAIN_STATE).exists()
                   and (p / ".metadata").exists())
    return found[-1] if found else None
