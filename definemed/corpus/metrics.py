"""Binary classification metrics shared by annotation quality and the classifier (no sklearn needed)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    return {"tp": int(np.sum(y_true & y_pred)), "fp": int(np.sum(~y_true & y_pred)),
            "fn": int(np.sum(y_true & ~y_pred)), "tn": int(np.sum(~y_true & ~y_pred))}


def fbeta(tp: int, fp: int, fn: int, beta: float) -> float:
    """F-beta; beta < 1 weighs precision higher (the study's 0.7). Empty denominators give 0.0."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    b2 = beta * beta
    return (1 + b2) * p * r / (b2 * p + r) if (b2 * p + r) > 0 else 0.0


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, F1. No positives predicted gives precision 0.0: predicting nothing is not a pass."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": fbeta(tp, fp, fn, 1.0)}


def at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float, beta: float = 1.0) -> dict[str, float]:
    c = counts(labels, np.asarray(scores) >= threshold)
    out: dict[str, float] = {"threshold": float(threshold), **c, **prf(c["tp"], c["fp"], c["fn"])}
    if beta != 1.0:
        out[f"f_beta_{beta:g}"] = fbeta(c["tp"], c["fp"], c["fn"], beta)
    out["kept_fraction"] = float(np.mean(np.asarray(scores) >= threshold)) if len(scores) else 0.0
    return out


def threshold_sweep(scores: np.ndarray, labels: np.ndarray, thresholds: Sequence[float],
                    beta: float = 1.0) -> list[dict[str, float]]:
    return [at_threshold(scores, labels, t, beta) for t in thresholds]


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score (descending), with the thresholds."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tps = np.cumsum(y)
    fps = np.cumsum(~y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.array([], dtype=int)
    tp, fp = tps[last], fps[last]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(int(y.sum()), 1)
    return precision, recall, s[last]


def bootstrap_prf(y_true: np.ndarray, y_pred: np.ndarray, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> dict[str, dict[str, float]]:
    """Point estimates plus percentile bootstrap CIs and standard deviations (documents resampled), through the
    project's one bootstrap (definemed.eval.stats.bootstrap_ci)."""
    from definemed.eval.stats import bootstrap_ci

    rows = np.column_stack([np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)]).astype(float)
    c = counts(rows[:, 0], rows[:, 1]) if len(rows) else {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    point = prf(c["tp"], c["fp"], c["fn"])
    out = {}
    for k, v in point.items():
        def stat(r, k=k):
            cb = counts(r[:, 0], r[:, 1])
            return prf(cb["tp"], cb["fp"], cb["fn"])[k]

        est = bootstrap_ci(rows, stat=stat, n_boot=n_boot, alpha=alpha, seed=seed) if len(rows) else None
        if est is None or np.isnan(est.lo):
            out[k] = {"value": float(v), "ci_low": float(v), "ci_high": float(v), "std": 0.0}
        else:
            out[k] = {"value": float(v), "ci_low": est.lo, "ci_high": est.hi, "std": est.std}
    return out
