"""The plan as a table (one row per request) followed by the projection inputs, and as JSON."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from definemed.plan.fit import StageFit
from definemed.plan.project import Projection
from definemed.plan.requests import StageRequests


@dataclass
class StagePlan:
    stage: str
    requests: StageRequests
    fit: StageFit
    projection: Projection | None = None
    reservation: dict[str, Any] | None = None
    tokens: Any = None  # definemed.plan.tokens.TokenPlan (the cpt stage)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "fits": self.fit.fits, "reason": self.fit.reason,
                "notes": self.requests.notes, "requests": [r.to_dict() for r in self.requests.requests],
                "fit": [p.to_dict() for p in self.fit.phases],
                "projection": self.projection.to_dict() if self.projection else None,
                "reservation": self.reservation,
                "tokens": self.tokens.to_dict() if self.tokens is not None else None}


def _range(lo: float, hi: float) -> str:
    f = (lambda x: f"{x:g}")
    return f(lo) if lo == hi else f"{f(lo)}-{f(hi)}"


def _per_unit(r) -> str:
    parts = []
    if r.gpus_per_unit:
        parts.append(f"{r.gpus_per_unit:g} GPU")
    cpu = r.per_unit("CPU")
    if cpu:
        parts.append(f"{cpu:g} CPU")
    mem = r.per_unit("memory")
    if mem:
        parts.append(f"{mem / 2**30:g} GiB")
    return ", ".join(parts) or "-"


HEADER = ("stage", "request", "units", "per unit", "GPUs", "node type", "fits", "wall h", "GPU-h")


def rows(plans: list[StagePlan]) -> list[tuple[str, ...]]:
    out = []
    for p in plans:
        units = p.fit.units()
        if not p.requests.requests:
            out.append((p.stage, "(driver only)", "-", "-", "0", "-", "yes", "-", "-"))
            continue
        for i, r in enumerate(p.requests.requests):
            n = units.get(r.key, 0)
            u = _range(r.min_units, r.max_units)
            if r.max_units > r.min_units:
                u += f" (fits {n})"
            gpus = _range(r.min_units * r.gpus_per_unit, r.max_units * r.gpus_per_unit)
            phase_fit = next(ph for ph in p.fit.phases if ph.phase == r.phase)
            fits = "yes" if phase_fit.fits else "NO"
            first = i == 0
            wall = gpu_h = ""
            if first and p.projection and not math.isnan(p.projection.wall_h):
                wall = f"{p.projection.wall_h:.1f}" if p.projection.wall_h >= 1 else f"{p.projection.wall_h:.2f}"
                gpu_h = f"{p.projection.gpu_h:,.0f}" if p.projection.gpu_h >= 10 else f"{p.projection.gpu_h:.1f}"
            label = r.what if r.phase in ("run", "") else f"[{r.phase}] {r.what}"
            out.append((p.stage if first else "", label, u, _per_unit(r), gpus, ", ".join(r.node_types) or "-",
                        fits, wall, gpu_h))
    return out


def table(plans: list[StagePlan]) -> str:
    body = rows(plans)
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(HEADER), line(["-" * w for w in widths]), *map(line, body)])


def render(plans: list[StagePlan], cluster_line: str) -> str:
    out = [cluster_line, "", table(plans), ""]
    notes = [f"  {p.stage}: {n}" for p in plans for n in p.requests.notes]
    notes += [f"  {p.stage}: {r.key}: {r.note}" for p in plans for r in p.requests.requests if r.note]
    if notes:
        out += ["notes:", *notes, ""]
    proj = [p for p in plans if p.projection]
    if proj:
        out.append("projection (inputs as stated; GPU-h = wall time x GPUs held):")
        out += [f"  {p.stage}: {p.projection.inputs}" for p in proj]
        done = [p.projection for p in proj if not math.isnan(p.projection.wall_h)]
        out.append(f"  total: {sum(x.wall_h for x in done):.1f} h, {sum(x.gpu_h for x in done):,.0f} GPU-h "
                   f"(stages one after another)")
        missing = [p.stage for p in plans if p.projection is None and p.requests.requests]
        if missing:
            out.append(f"  not projected (no throughput figure): {', '.join(missing)}")
        out.append("")
    for p in plans:
        if p.tokens is not None:
            out += [*p.tokens.lines(), ""]
    bad = [p for p in plans if not p.fit.fits]
    for p in bad:
        out.append(f"DOES NOT FIT: {p.stage}: {p.fit.reason}")
    for p in plans:
        if p.reservation is not None:
            status = "reserved and released" if p.reservation["ok"] else "RESERVATION FAILED"
            errors = "; ".join(ph["error"] for ph in p.reservation["phases"] if ph.get("error"))
            out.append(f"live check {p.stage}: {status}" + (f" ({errors})" if errors else ""))
    out.append("plan fits" if not bad else f"plan does not fit: {len(bad)} stage(s)")
    return "\n".join(out)
