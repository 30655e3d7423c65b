"""Bootstrap confidence intervals shared by MC accuracy and win-rates (seeded, so reports are reproducible)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float
    n: int

    def fmt(self, pct: bool = False) -> str:
        if self.n == 0 or np.isnan(self.value):
            return "n/a"
        f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
        return f"{f(self.value)} [{f(self.lo)}, {f(self.hi)}]"

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "n": self.n}


def bootstrap_ci(values: Sequence[float] | np.ndarray, stat: Callable[[np.ndarray], float] | None = None,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Percentile bootstrap over items (rows of `values`); a statistic that fails on a resample returns nan and
    that resample is dropped. `stat` defaults to the mean."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if stat is None:
        return mean_ci(x, n_boot=n_boot, alpha=alpha, seed=seed)
    point = float(stat(x))
    rng = np.random.default_rng(seed)
    boots = np.array([stat(x[i]) for i in rng.integers(0, n, size=(n_boot, n))], dtype=float)
    boots = boots[~np.isnan(boots)]
    if len(boots) == 0:
        return Estimate(point, float("nan"), float("nan"), n)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Estimate(point, float(lo), float(hi), n)


def mean_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Bootstrap CI of a mean, vectorised (the common case: accuracy, win-rate)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(x.mean()), float(lo), float(hi), n)
