"""Schemas for the deployment files (cluster launcher YAML, KubeRay RayCluster / RayJob / RayService).

They check what a broken edit would get wrong before `ray up` or `kubectl apply` does: required fields,
resource requests on every container, GPU requests on GPU groups, sane autoscaling bounds, and that job
entrypoints point at modules and configs that exist. Extra fields are allowed (the CRDs have many).

    python -m definemed.ops.manifests cluster.yaml infra/k8s/*.yaml
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

REPO = Path(__file__).resolve().parents[2]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- Ray cluster launcher -------------------------------------------------------------------------------
class NodeType(_Open):
    resources: dict[str, float]
    node_config: dict[str, Any]
    min_workers: int = 0
    max_workers: int | None = None

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_workers is not None and not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 0 <= min_workers ({self.min_workers}) <= max_workers ({self.max_workers})")
        return self


class LauncherConfig(_Open):
    cluster_name: str
    provider: dict[str, Any]
    max_workers: int | None = None
    available_node_types: dict[str, NodeType] | None = None
    head_node_type: str | None = None
    head_start_ray_commands: list[str]
    worker_start_ray_commands: list[str]

    @model_validator(mode="after")
    def _checks(self):
        if self.provider.get("type") == "local":
            if not self.provider.get("head_ip") or not self.provider.get("worker_ips"):
                raise ValueError("on-prem (local) provider needs head_ip and worker_ips")
        else:
            types = self.available_node_types or {}
            if self.head_node_type not in types:
                raise ValueError("head_node_type must be one of available_node_types")
            gpu = [n for n, t in types.items() if t.resources.get("GPU", 0) > 0]
            if not gpu:
                raise ValueError("no GPU node type")
            if sum(t.min_workers for t in types.values()) > (self.max_workers or 0):
                raise ValueError("global max_workers is below the sum of min_workers")
        head = " ".join(self.head_start_ray_commands)
        if "--dashboard-host=127.0.0.1" not in head:
            raise ValueError("the dashboard (job submission API) must bind to 127.0.0.1 on the head")
        return self


# ---- Kubernetes / KubeRay --------------------------------------------------------------------------------
class Resources(_Open):
    requests: dict[str, str | int | float]
    limits: dict[str, str | int | float]

    @model_validator(mode="after")
    def _cpu_mem(self):
        for k in ("cpu", "memory"):
            if k not in self.requests:
                raise ValueError(f"resources.requests.{k} missing")
        return self


class Container(_Open):
    name: str
    image: str
    resources: Resources


class PodSpec(_Open):
    containers: list[Container]


class PodTemplate(_Open):
    spec: PodSpec


class HeadGroup(_Open):
    rayStartParams: dict[str, str]
    template: PodTemplate


class WorkerGroup(_Open):
    groupName: str
    minReplicas: int
    maxReplicas: int
    rayStartParams: dict[str, str]
    template: PodTemplate

    @model_validator(mode="after")
    def _bounds(self):
        if not 0 <= self.minReplicas <= self.maxReplicas:
            raise ValueError(f"{self.groupName}: need 0 <= minReplicas <= maxReplicas")
        if "gb" in self.groupName.lower() and "a100" in self.groupName.lower():
            for c in self.template.spec.containers:
                if "nvidia.com/gpu" not in c.resources.limits:
                    raise ValueError(f"{self.groupName}: GPU group without nvidia.com/gpu limit")
        return self


class RayClusterSpec(_Open):
    rayVersion: str
    headGroupSpec: HeadGroup
    workerGroupSpecs: list[WorkerGroup]
    enableInTreeAutoscaling: bool | None = None


class Metadata(_Open):
    name: str
    labels: dict[str, str] = {}


class RayCluster(_Open):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: Metadata
    spec: RayClusterSpec

    @model_validator(mode="after")
    def _autoscale(self):
        if not self.spec.enableInTreeAutoscaling:
            raise ValueError("the RayCluster must enable the autoscaler")
        return self


_ENTRY = re.compile(r"^python -m (?P<mod>jobs\.[a-z_]+) --config (?P<cfg>\S+)$")


class RayJobSpec(_Open):
    entrypoint: str
    clusterSelector: dict[str, str] | None = None
    rayClusterSpec: RayClusterSpec | None = None

    @field_validator("entrypoint")
    @classmethod
    def _entry_exists(cls, v: str) -> str:
        m = _ENTRY.match(v)
        if not m:
            raise ValueError(f"entrypoint must be 'python -m jobs.<stage> --config <file>', got {v!r}")
        mod = REPO / (m["mod"].replace(".", "/") + ".py")
        if not mod.exists():
            raise ValueError(f"entrypoint module {m['mod']} does not exist ({mod})")
        if not (REPO / m["cfg"]).exists():
            raise ValueError(f"entrypoint config {m['cfg']} does not exist")
        return v

    @model_validator(mode="after")
    def _cluster(self):
        if not self.clusterSelector and not self.rayClusterSpec:
            raise ValueError("RayJob needs clusterSelector or rayClusterSpec")
        return self


class RayJob(_Open):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: Metadata
    spec: RayJobSpec


class RayServiceSpec(_Open):
    serveConfigV2: str
    rayClusterConfig: RayClusterSpec

    @field_validator("serveConfigV2")
    @classmethod
    def _serve_cfg(cls, v: str) -> str:
        cfg = yaml.safe_load(v)
        apps = cfg.get("applications") or []
        if not apps:
            raise ValueError("serveConfigV2 has no applications")
        for app in apps:
            mod = app["import_path"].rsplit(":", 1)[0] if ":" in app["import_path"] else app["import_path"].rsplit(".", 1)[0]
            if not (REPO / (mod.replace(".", "/") + ".py")).exists() and not (REPO / mod.replace(".", "/")).is_dir():
                raise ValueError(f"import_path module {mod} does not exist")
        return v

    @model_validator(mode="after")
    def _secret_and_probes(self):
        head_tpl = self.rayClusterConfig.headGroupSpec.template
        head = head_tpl.spec.containers[0]
        # Every pod that can host the ingress replica needs the keys from a Secret (env ref or mounted volume).
        for tpl in [head_tpl] + [g.template for g in self.rayClusterConfig.workerGroupSpecs]:
            env = [e for c in tpl.spec.containers for e in (getattr(c, "env", None) or [])]
            vols = getattr(tpl.spec, "volumes", None) or []
            if not (any((e.get("valueFrom") or {}).get("secretKeyRef") for e in env)
                    or any("secret" in v for v in vols)):
                raise ValueError("every serving pod must read the API keys from a Kubernetes Secret")
        for probe in ("readinessProbe", "livenessProbe"):
            if not getattr(head, probe, None):
                raise ValueError(f"the serving head container needs a {probe}")
        return self


class RayService(_Open):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: Metadata
    spec: RayServiceSpec


KINDS = {"RayCluster": RayCluster, "RayJob": RayJob, "RayService": RayService}


def validate_file(path: str | Path) -> list[str]:
    """Validate every YAML document in `path`; returns the kinds validated. Raises ValueError on a problem."""
    p = Path(path)
    docs = [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d is not None]
    kinds = []
    for doc in docs:
        try:
            if "cluster_name" in doc:
                LauncherConfig.model_validate(doc)
                kinds.append("cluster-launcher")
            elif doc.get("kind") in KINDS:
                KINDS[doc["kind"]].model_validate(doc)
                kinds.append(doc["kind"])
            else:
                kinds.append(doc.get("kind", "unknown"))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"{p}: {loc or '<root>'}: {err['msg']}") from None
    return kinds


def main(argv: list[str] | None = None) -> int:
    rc = 0
    for f in argv if argv is not None else sys.argv[1:]:
        try:
            print(f"{f}: ok ({', '.join(validate_file(f))})")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
