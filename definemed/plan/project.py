"""Projected wall time and GPU-hours of a stage, from throughput figures that say where they come from.

Work comes from the stage config where it says it (annotate: sample_size documents; cpt: max_steps x
global_batch_tokens tokens), else from the cluster spec's `throughput` entry (e.g. the number of FineWeb2-de
documents the filter reads). Every projection prints its inputs, so a booked number can be checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from definemed.config import StrictModel


class Throughput(StrictModel):
    """How fast one stage runs on the planned hardware, and where the figure comes from."""

    request: str | None = None  # the request whose units the rate scales with (default: the stage's first)
    work: float | None = Field(None, gt=0)  # total items of work; default: what the stage config says
    unit: str = "items"  # docs, tokens, samples, ...
    rate: float | None = Field(None, gt=0)  # items per second per `per`
    per: Literal["unit", "gpu", "cpu"] = "unit"  # per unit of the request (replica, actor, worker), GPU or CPU
    wall_h: float | None = Field(None, gt=0)  # a direct estimate instead of work / rate
    startup_h: float = Field(0.0, ge=0)  # model loading, engine start, cluster scale-up
    source: str = Field(min_length=1)  # "measured by benchmarks/... on ..." or "assumed: ..."

    @model_validator(mode="after")
    def _rate_or_wall(self):
        if (self.rate is None) == (self.wall_h is None):
            raise ValueError("give either rate (with work) or wall_h")
        return self


def config_work(stage: str, cfg) -> tuple[float, str, str] | None:
    """(work, unit, where it comes from) when the stage config states how much work there is."""
    if stage == "annotate":
        return float(cfg.sample_size), "docs", "config sample_size"
    if stage == "cpt":
        return (float(cfg.train.max_steps * cfg.train.global_batch_tokens), "tokens",
                "config max_steps x global_batch_tokens")
    if stage == "merge-search":
        return float(cfg.trials), "trials", "config trials"
    return None


@dataclass
class Projection:
    wall_h: float
    gpu_h: float
    inputs: str

    def to_dict(self) -> dict[str, Any]:
        return {"wall_h": self.wall_h, "gpu_h": self.gpu_h, "inputs": self.inputs}


def _num(x: float) -> str:
    if x >= 1e9:
        return f"{x / 1e9:.3g}B"
    if x >= 1e6:
        return f"{x / 1e6:.4g}M"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def project(stage: str, cfg, requests: list, units: dict[str, int], thr: Throughput | None) -> Projection | None:
    """`units`: how many units of each request the cluster holds at once (autoscaled requests: as many as fit)."""
    if thr is None or not requests:
        return None
    main = next((r for r in requests if r.key == thr.request), requests[0]) if thr.request else requests[0]
    n = units.get(main.key, main.min_units)

    def phase_gpus(phase: str) -> float:
        return sum(units.get(r.key, r.min_units) * r.gpus_per_unit for r in requests if r.phase == phase)

    gpus = phase_gpus(main.phase)
    each = f" ({main.gpus_per_unit:g} GPU each)" if main.gpus_per_unit else ""
    held = f"{n} x {main.what}{each}"
    if thr.wall_h is not None:
        # A direct estimate covers every phase: book the largest phase's GPUs for all of it.
        phases = list(dict.fromkeys(r.phase for r in requests))
        gpus = max(phase_gpus(p) for p in phases)
        wall = thr.wall_h + thr.startup_h
        held = f"{len(phases)} phase(s), up to {gpus:g} GPUs at once" if len(phases) > 1 else held
        text = f"{held}; {thr.wall_h:g} h ({thr.source})"
    else:
        given = config_work(stage, cfg)
        if thr.work is not None:
            work, unit, where = thr.work, thr.unit, "cluster spec"
        elif given is not None:
            work, unit, where = given
        else:
            return Projection(float("nan"), float("nan"), f"{held}; no amount of work: give throughput.{stage}.work")
        scale = {"unit": n, "gpu": gpus, "cpu": n * main.per_unit("CPU")}[thr.per]
        if scale <= 0:
            return Projection(float("nan"), float("nan"), f"{held}; rate is per {thr.per} but it holds none")
        seconds = work / (thr.rate * scale)
        wall = seconds / 3600 + thr.startup_h
        text = (f"{held}; {_num(work)} {unit} ({where}) at {thr.rate:,.4g} {unit}/s per {thr.per} "
                f"({thr.source})")
    if thr.startup_h:
        text += f" + {thr.startup_h:g} h start-up"
    gpu_h = wall * gpus
    return Projection(wall, gpu_h, f"{text} -> {hours(wall)}, {gpu_hours(gpu_h)}")


def hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def gpu_hours(x: float) -> str:
    return f"{x:,.1f} GPU-h" if x < 10 else f"{x:,.0f} GPU-h"
