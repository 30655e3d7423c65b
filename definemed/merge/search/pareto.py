"""Pareto dominance over several objectives, each minimised or maximised: the selection rule of the merge search.

A point dominates another when it is no worse on every objective and strictly better on at least one. A missing
or nan value counts as the worst possible, so a trial that could not be scored never dominates and is dominated
by any scored trial that is no worse elsewhere.
"""
from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

Mode = Literal["min", "max"]


def _key(value: float | None, mode: Mode) -> float:
    """The value as a quantity to minimise; missing or nan is +inf."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    return float(value) if mode == "min" else -float(value)


def dominates(a: Mapping[str, float], b: Mapping[str, float], objectives: Sequence[tuple[str, Mode]]) -> bool:
    ka = [_key(a.get(m), mode) for m, mode in objectives]
    kb = [_key(b.get(m), mode) for m, mode in objectives]
    return all(x <= y for x, y in zip(ka, kb)) and any(x < y for x, y in zip(ka, kb))


def pareto_front(points: Sequence[Mapping[str, float]], objectives: Sequence[tuple[str, Mode]]) -> list[int]:
    """Indices of the non-dominated points, in input order. Exact duplicates are all kept (neither dominates)."""
    if not objectives:
        raise ValueError("at least one objective is needed")
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, objectives) for j, q in enumerate(points) if j != i)]
