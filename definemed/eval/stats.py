"""The project's bootstrap confidence intervals (scipy.stats.bootstrap, seeded so reports are reproducible): one
model's metric over items, and paired comparisons of two models on the same items (difference, ratio)."""
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


def paired_bootstrap(rows_a: Sequence | np.ndarray, rows_b: Sequence | np.ndarray,
                     stat: Callable[[np.ndarray, np.ndarray], float], n_boot: int = 1000, alpha: float = 0.05,
                     seed: int = 0, what: str = "") -> Estimate:
    """stat(a, b) of two models scored on the same items, with a paired percentile bootstrap CI: every resample
    draws the same items (rows) for both models, so what the items have in common (a hard document, an easy
    question) cancels out. Row i of `rows_a` and of `rows_b` must be the same item."""
    a, b = np.asarray(rows_a, dtype=float), np.asarray(rows_b, dtype=float)
    if a.shape[:1] != b.shape[:1] or a.ndim != b.ndim:
        raise ValueError(f"{what + ': ' if what else ''}the two models were scored on different items "
                         f"({a.shape} vs {b.shape})")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    k = a.shape[1]
    return bootstrap_ci(np.hstack([a, b]), stat=lambda x: stat(x[:, :k], x[:, k:]), n_boot=n_boot, alpha=alpha,
                        seed=seed)


def paired_difference(rows_a: Sequence | np.ndarray, rows_b: Sequence | np.ndarray,
                      stat: Callable[[np.ndarray], float] | None = None, n_boot: int = 1000, alpha: float = 0.05,
                      seed: int = 0, what: str = "") -> Estimate:
    """stat(a) - stat(b) (default: the mean of column 0) with a paired bootstrap CI over the shared items: the
    project's one test of "model A beats model B on these items" (merge search verdicts, KD vs CE-only)."""
    f = stat or (lambda x: float(x[:, 0].mean()))
    return paired_bootstrap(rows_a, rows_b, lambda a, b: f(a) - f(b), n_boot=n_boot, alpha=alpha, seed=seed,
                            what=what)


def paired_ratio(rows_a: Sequence | np.ndarray, rows_b: Sequence | np.ndarray,
                 stat: Callable[[np.ndarray], float] | None = None, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, what: str = "") -> Estimate:
    """stat(a) / stat(b) with a paired bootstrap CI (retention: a student's metric over its teacher's). A resample
    where stat(b) is 0 gives nan and is dropped (bootstrap_ci)."""
    f = stat or (lambda x: float(x[:, 0].mean()))

    def ratio(a: np.ndarray, b: np.ndarray) -> float:
        den = f(b)
        return f(a) / den if den and not np.isnan(den) else float("nan")

    return paired_bootstrap(rows_a, rows_b, ratio, n_boot=n_boot, alpha=alpha, seed=seed, what=what)
