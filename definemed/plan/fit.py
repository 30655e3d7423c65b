"""Place a stage's requests on a cluster's nodes the way Ray's placement-group strategies do, without Ray.

Per phase, every request's `min_units` must fit at the same time (else the stage cannot start); then autoscaled
requests grow unit by unit, round robin, up to `max_units` or until nothing more fits. This is a model of Ray's
scheduler (best-fit within the strategy's rules); `definemed plan --reserve` checks the same requests on a live
cluster with real placement groups.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from definemed.plan.cluster import Node
from definemed.plan.requests import Bundle, Request, StageRequests

EPS = 1e-9


def _fits(free: dict[str, float], need: Bundle) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in need.items())


def _take(node: Node, need: Bundle) -> None:
    for k, v in need.items():
        node.free[k] = node.free.get(k, 0.0) - v


def _sum(bundles: list[Bundle]) -> Bundle:
    out: Bundle = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _leftover(node: Node, need: Bundle) -> tuple:
    """Best fit: prefer the node left with the fewest GPUs, then CPUs (keeps big nodes whole for big groups)."""
    return (node.free.get("GPU", 0.0) - need.get("GPU", 0.0), node.free.get("CPU", 0.0) - need.get("CPU", 0.0),
            node.node_id)


def place_unit(nodes: list[Node], bundles: list[Bundle], strategy: str) -> list[str] | None:
    """Node id per bundle for one placement group, taking the resources; None (nothing taken) if it cannot."""
    if strategy in ("PACK", "STRICT_PACK"):
        need = _sum(bundles)
        whole = [n for n in nodes if _fits(n.free, need)]
        if whole:
            node = min(whole, key=lambda n: _leftover(n, need))
            _take(node, need)
            return [node.node_id] * len(bundles)
        if strategy == "STRICT_PACK":
            return None
    trial = copy.deepcopy(nodes)
    by_id = {n.node_id: n for n in trial}
    placed: list[str] = []
    for b in bundles:
        cands = [n for n in trial if _fits(n.free, b)]
        if strategy in ("SPREAD", "STRICT_SPREAD"):
            unused = [n for n in cands if n.node_id not in placed]
            if strategy == "STRICT_SPREAD":
                cands = unused
            elif unused:
                cands = unused
        if not cands:
            return None
        if strategy in ("SPREAD", "STRICT_SPREAD"):
            node = max(cands, key=lambda n: (n.free.get("GPU", 0.0), n.free.get("CPU", 0.0), n.node_id))
        else:
            node = min(cands, key=lambda n: _leftover(n, b))
        _take(node, b)
        placed.append(node.node_id)
    for n in nodes:
        n.free = by_id[n.node_id].free
    return placed


@dataclass
class PhaseFit:
    phase: str
    fits: bool
    units: dict[str, int] = field(default_factory=dict)  # units placed per request key (after growing)
    placements: dict[str, list[list[str]]] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "fits": self.fits, "units": self.units, "reason": self.reason,
                "placements": self.placements}


def _describe(r: Request) -> str:
    b = _sum(r.bundles)
    parts = [f"{b[k]:g} {k}" for k in ("GPU", "CPU") if b.get(k)]
    if b.get("memory"):
        parts.append(f"{b['memory'] / 2**30:g} GiB memory")
    parts += [f"{k}" for k in r.node_types]
    return f"{r.key}: {r.min_units} x {{{', '.join(parts)}}}"


def fit_phase(nodes: list[Node], requests: list[Request], phase: str) -> PhaseFit:
    nodes = copy.deepcopy(nodes)
    for n in nodes:
        n.free = dict(n.total)
    order = sorted(requests, key=lambda r: (-r.gpus_per_unit * r.min_units, -r.per_unit("CPU") * r.min_units))
    pf = PhaseFit(phase, True)
    for r in order:
        pf.placements[r.key] = []
        for i in range(r.min_units):
            where = place_unit(nodes, r.bundles, r.strategy)
            if where is None:
                free_gpu = sum(n.free.get("GPU", 0.0) for n in nodes)
                pf.fits = False
                pf.reason = (f"{_describe(r)} ({r.strategy}): only {i} unit(s) fit; {free_gpu:g} GPUs were left "
                             f"free after the requests before it")
                pf.units[r.key] = i
                return pf
            pf.placements[r.key].append(where)
        pf.units[r.key] = r.min_units
    growing = [r for r in order if r.max_units > r.min_units]
    while growing:
        for r in list(growing):
            where = place_unit(nodes, r.bundles, r.strategy)
            if where is None:
                growing.remove(r)
                continue
            pf.placements[r.key].append(where)
            pf.units[r.key] += 1
            if pf.units[r.key] >= r.max_units:
                growing.remove(r)
    return pf


@dataclass
class StageFit:
    stage: str
    phases: list[PhaseFit]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases)

    @property
    def reason(self) -> str:
        return "; ".join(f"{p.phase}: {p.reason}" for p in self.phases if not p.fits)

    def units(self) -> dict[str, int]:
        return {k: v for p in self.phases for k, v in p.units.items()}


def fit_stage(nodes: list[Node], sreq: StageRequests) -> StageFit:
    return StageFit(sreq.stage, [fit_phase(nodes, sreq.in_phase(p), p) for p in sreq.phases()])
