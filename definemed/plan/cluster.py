"""A cluster to plan against: from a spec file (book GPUs before the cluster exists) or a live Ray cluster.

Both become the same list of `Node`s with Ray's resource names (CPU, GPU, memory in bytes, accelerator_type:<X>,
custom node-type resources), so the fit is computed the same way for both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ByteSize, Field, model_validator

from definemed.config import StrictModel, load_config
from definemed.plan.project import Throughput
from definemed.plan.tokens import TokenBudget

HEAD_RESOURCE = "node:__internal_head__"


class NodeGroup(StrictModel):
    """`count` identical nodes, described the way `ray start` (or a KubeRay worker group) advertises them."""

    name: str
    count: int = Field(1, ge=1)
    head: bool = False
    cpus: float = Field(ge=0)  # logical CPUs Ray may schedule (KubeRay heads usually 0)
    gpus: float = Field(0, ge=0)
    memory: ByteSize = Field(description="Ray's logical `memory` resource on the node, e.g. 900GiB")
    accelerator_type: str | None = None  # e.g. A100: Ray adds accelerator_type:A100 for detected GPUs
    resources: dict[str, float] = {}  # custom resources, e.g. {a100_40gb: 8} from rayStartParams
    description: str = ""

    def ray_resources(self) -> dict[str, float]:
        res = {"CPU": float(self.cpus), "GPU": float(self.gpus), "memory": float(self.memory),
               **{k: float(v) for k, v in self.resources.items()}}
        if self.accelerator_type and self.gpus:
            res.setdefault(f"accelerator_type:{self.accelerator_type}", float(self.gpus))
        return {k: v for k, v in res.items() if v}


class ClusterSpec(StrictModel):
    """configs/cluster/*-cluster.yaml: the nodes of a cluster and the throughput figures to plan with."""

    name: str
    description: str = ""
    nodes: list[NodeGroup] = Field(min_length=1)
    throughput: dict[str, Throughput] = {}  # per stage name
    tokens: TokenBudget = TokenBudget()  # words -> tokens per model family with measured fertility

    @model_validator(mode="after")
    def _one_head(self):
        heads = sum(g.count for g in self.nodes if g.head)
        if heads != 1:
            raise ValueError(f"exactly one head node is needed, found {heads}")
        return self


@dataclass
class Node:
    node_id: str
    group: str
    head: bool
    total: dict[str, float]
    free: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not self.free:
            self.free = dict(self.total)

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "group": self.group, "head": self.head, "resources": self.total}


def load_spec(path: str | Path) -> ClusterSpec:
    return load_config(ClusterSpec, path)


def nodes_from_spec(spec: ClusterSpec) -> list[Node]:
    out = []
    for g in spec.nodes:
        for i in range(g.count):
            out.append(Node(f"{g.name}-{i}" if g.count > 1 else g.name, g.name, g.head, g.ray_resources()))
    return out


def nodes_from_ray() -> list[Node]:
    """The alive nodes of the connected Ray cluster (call after ray.init)."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
        head = HEAD_RESOURCE in n["Resources"]
        out.append(Node(n["NodeID"], "head" if head else n.get("NodeManagerAddress", "worker"), head, res))
    return sorted(out, key=lambda x: (not x.head, x.node_id))


def totals(nodes: list[Node]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in nodes:
        for k, v in n.total.items():
            out[k] = out.get(k, 0.0) + v
    return out
