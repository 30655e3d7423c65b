"""Where work runs: the one CPU-vs-GPU decision, taken from config and the Ray cluster, never from the driver.

A stage states the device it wants (`accelerator: auto | gpu | cpu`, or `use_gpu` for Ray Train). `auto` means
"GPU if the cluster has any": `ray.cluster_resources()` of the connected cluster, or the totals of a planned
cluster. The driver's own hardware does not count: a KubeRay head has no GPU, and a laptop driving a GPU cluster
has none either. Only when no Ray is connected does the work run in this very process, and then this process's
hardware is the cluster.

`auto` sees the nodes that are up *now*. An autoscaling cluster whose GPU groups start at zero has no GPU until
work asks for one, so cluster configs say `gpu` explicitly.
"""
from __future__ import annotations

import logging
from typing import Literal, Mapping

log = logging.getLogger(__name__)

Accelerator = Literal["auto", "gpu", "cpu"]
Device = Literal["gpu", "cpu"]


def local_resources() -> dict[str, float]:
    """This process's GPUs, for work that runs here without Ray."""
    try:
        import torch

        return {"GPU": float(torch.cuda.device_count())}
    except ImportError:
        return {"GPU": 0.0}


def cluster_resources() -> dict[str, float] | None:
    """Total resources of the connected Ray cluster; None when no Ray is connected."""
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else None


def resolve_device(choice: Accelerator | bool, resources: Mapping[str, float] | None = None) -> Device:
    """`gpu`/`cpu` as stated (True/False as Ray Train's use_gpu); `auto`: GPU if `resources` (default: the
    connected cluster's) has any."""
    if choice is True or choice == "gpu":
        return "gpu"
    if choice is False or choice == "cpu":
        return "cpu"
    if choice != "auto":
        raise ValueError(f"accelerator must be auto, gpu or cpu, not {choice!r}")
    res = resources if resources is not None else cluster_resources()
    if res is None:
        res = local_resources()
    return "gpu" if res.get("GPU", 0) > 0 else "cpu"
