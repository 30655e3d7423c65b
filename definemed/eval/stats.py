"""The project's one bootstrap confidence interval (scipy.stats.bootstrap, seeded so reports are reproducible)."""
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
    std: float = float("nan")  # standard deviation of the bootstrap distribution

    def fmt(self, pct: bool = False) -> str:
        if self.n == 0 or np.isnan(self.value):
            return "n/a"
        f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
        return f"{f(self.value)} [{f(self.lo)}, {f(self.hi)}]"

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "n": self.n}


def bootstrap_ci(values: Sequence[float] | np.ndarray, stat: Callable[[np.ndarray], float] | None = None,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Percentile bootstrap over items (rows of `values`), by scipy.stats.bootstrap: the one bootstrap of the
    project (MC accuracy, win-rates, perplexity, annotation and classifier quality).

    `stat` maps the rows of a resample to a number and defaults to the mean. Resamples whose statistic is nan
    (e.g. a metric undefined on that resample) are dropped before taking the percentiles.
    """
    import warnings

    from scipy.stats import DegenerateDataWarning, bootstrap

    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if stat is None:
        point = float(x.mean())
        statistic, vectorized = (lambda idx, axis=-1: x[idx.astype(int)].mean(axis=-1)), True
    else:
        point = float(stat(x))
        statistic, vectorized = (lambda idx: stat(x[idx.astype(int)])), False
    if n == 1:  # every resample is the one item
        return Estimate(point, point, point, n)
    with warnings.catch_warnings():
        # identical items (e.g. every answer failed) give a degenerate distribution: the percentile CI is then
        # the point itself, which is right; scipy's warning about it is noise
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap((np.arange(n),), statistic, n_resamples=n_boot, vectorized=vectorized,
                        method="percentile", confidence_level=1 - alpha, rng=np.random.default_rng(seed))
    boots = np.asarray(res.bootstrap_distribution, dtype=float)
    boots = boots[~np.isnan(boots)]
    if len(boots) == 0:
        return Estimate(point, float("nan"), float("nan"), n)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Estimate(point, float(lo), float(hi), n, float(np.std(boots)))


def mean_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Bootstrap CI of a mean (accuracy, win-rate)."""
    return bootstrap_ci(values, None, n_boot=n_boot, alpha=alpha, seed=seed)
