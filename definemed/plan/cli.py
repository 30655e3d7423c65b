"""`definemed plan --config FILE [--stage NAME] [--ray-address ADDR | --cluster-spec FILE] [--reserve]`.

Exit codes: 0 the plan fits (and, with --reserve, every placement group became ready), 1 it does not, 2 a config
was rejected before anything was planned.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from definemed.config import StrictModel
from definemed.plan.cluster import ClusterSpec, Node, load_spec, nodes_from_ray, nodes_from_spec, totals
from definemed.plan.fit import fit_stage
from definemed.plan.load import load_stages
from definemed.plan.project import Throughput, project
from definemed.plan.report import StagePlan, render
from definemed.plan.requests import stage_requests
from definemed.plan.tokens import TokenBudget, token_plan


class ThroughputFile(StrictModel):
    throughput: dict[str, Throughput]
    tokens: TokenBudget = TokenBudget()


def _cluster_line(nodes: list[Node], source: str) -> str:
    t = totals(nodes)
    head = next((n for n in nodes if n.head), None)
    acc = sorted(k.split(":", 1)[1] for k in t if k.startswith("accelerator_type:"))
    return (f"cluster ({source}): {len(nodes)} nodes, {t.get('GPU', 0):g} GPUs"
            + (f" ({', '.join(acc)})" if acc else "") + f", {t.get('CPU', 0):g} CPUs, "
            f"{t.get('memory', 0) / 2**30:,.0f} GiB memory; head: "
            + (f"{head.total.get('GPU', 0):g} GPUs, {head.total.get('CPU', 0):g} CPUs" if head else "unknown"))


def plan(config: str, stage: str | None = None, ray_address: str | None = None, cluster_spec: str | None = None,
         throughput: str | None = None, reserve: bool = False,
         reserve_timeout_s: float = 120.0) -> tuple[list[StagePlan], list[Node], str]:
    stages, ray_cfg = load_stages(config, stage)
    thr: dict[str, Throughput] = {}
    budget = TokenBudget()
    if cluster_spec:
        spec: ClusterSpec = load_spec(cluster_spec)
        nodes, source = nodes_from_spec(spec), f"{cluster_spec}: {spec.name}"
        thr.update(spec.throughput)
        budget = spec.tokens
    else:
        from definemed.ray_utils import init_ray

        init_ray(ray_cfg, address=ray_address)
        nodes, source = nodes_from_ray(), f"live Ray at {ray_address or ray_cfg.address or 'local'}"
    if throughput:  # any YAML with a `throughput:` section, e.g. a cluster spec
        from definemed.config import load_yaml, parse_config

        raw = load_yaml(throughput)
        section = {"throughput": raw.get("throughput") or {}, "tokens": raw.get("tokens") or {}}
        parsed = parse_config(ThroughputFile, section, source=throughput)
        thr.update(parsed.throughput)
        if raw.get("tokens"):
            budget = parsed.tokens
    resources = totals(nodes)
    plans = []
    for name, cfg in stages:
        sreq = stage_requests(name, cfg, resources)
        fit = fit_stage(nodes, sreq)
        proj = project(name, cfg, sreq.requests, fit.units(), thr.get(name)) if fit.fits else None
        sp = StagePlan(name, sreq, fit, proj)
        if reserve and sreq.requests:
            from definemed.plan.reserve import reserve_stage

            sp.reservation = reserve_stage(sreq, reserve_timeout_s)
        if name == "cpt":  # words -> tokens per model family, with the measured fertility
            sp.tokens = token_plan(budget, (cfg, sreq.requests, fit.units(), thr.get(name)))
        plans.append(sp)
    return plans, nodes, _cluster_line(nodes, source)


def main(config: str, stage: str | None = None, ray_address: str | None = None, cluster_spec: str | None = None,
         throughput: str | None = None, reserve: bool = False, json_out: str | None = None) -> int:
    """Print the plan; the exit code says whether it fits. ConfigError propagates (the CLI exits 2)."""
    from definemed.config import ConfigError

    if reserve and cluster_spec:
        raise ConfigError("--reserve needs a live cluster (--ray-address), not --cluster-spec")
    plans, nodes, line = plan(config, stage, ray_address, cluster_spec, throughput, reserve)
    print(render(plans, line), flush=True)
    ok = all(p.fit.fits for p in plans) and all(p.reservation is None or p.reservation["ok"] for p in plans)
    if json_out:
        from definemed.io import atomic_write_json

        doc: dict[str, Any] = {"config": config, "cluster": {"source": line, "nodes": [n.to_dict() for n in nodes]},
                               "fits": ok, "stages": [p.to_dict() for p in plans]}
        atomic_write_json(Path(json_out), json.loads(json.dumps(doc, default=str)))
    return 0 if ok else 1
