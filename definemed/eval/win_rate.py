"""Pairwise win-rate from two-order judge verdicts, position consistency, and a length-controlled win-rate.

A pair (prompt, candidate, opponent) is judged twice, the candidate once in position A and once in B.
Agreeing verdicts decide the pair; disagreeing ones make it a tie (the judge's preference was positional);
any unparsed verdict makes the pair `unparsed`, which is counted and left out of n, never guessed.

Length control follows AlpacaEval-LC: a logistic model of the pair score on a bounded length difference,
P(win) = sigmoid(b0 + b1 * tanh(dlen / sd(dlen))), read off at zero difference: LC = sigmoid(b0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np

from definemed.eval.stats import Estimate, bootstrap_ci, mean_ci

Verdict = Literal["A", "B", "tie", "unparsed"]
Outcome = Literal["win", "loss", "tie", "unparsed"]
SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def _to_candidate(verdict: Verdict, candidate_pos: Literal["A", "B"]) -> Outcome:
    if verdict == "unparsed":
        return "unparsed"
    if verdict == "tie":
        return "tie"
    return "win" if verdict == candidate_pos else "loss"


def combine_orders(verdict_cand_first: Verdict, verdict_cand_second: Verdict) -> tuple[Outcome, bool | None]:
    """Outcome for the candidate from the verdict with the candidate in position A and the one with it in B.

    Returns (outcome, consistent); consistent is None when either verdict is unparsed."""
    o1 = _to_candidate(verdict_cand_first, "A")
    o2 = _to_candidate(verdict_cand_second, "B")
    if "unparsed" in (o1, o2):
        return "unparsed", None
    if o1 == o2:
        return o1, True
    return "tie", False


@dataclass(frozen=True)
class PairResult:
    prompt_id: str
    candidate: str
    opponent: str
    outcome: Outcome
    consistent: bool | None
    len_candidate: float
    len_opponent: float


def scores_of(outcomes: Iterable[Outcome]) -> np.ndarray:
    return np.array([SCORE[o] for o in outcomes if o != "unparsed"], dtype=float)


def win_rate(outcomes: Sequence[Outcome], n_boot: int = 1000, seed: int = 0) -> Estimate:
    """(wins + 1/2 ties) / n over parsed pairs, with a percentile bootstrap CI."""
    return mean_ci(scores_of(outcomes), n_boot=n_boot, seed=seed)


def position_consistency(consistent: Sequence[bool | None]) -> Estimate:
    """Share of pairs (both verdicts parsed) where the judge picked the same answer in both orders."""
    vals = np.array([1.0 if c else 0.0 for c in consistent if c is not None])
    return mean_ci(vals)


def length_feature(len_diff: Sequence[float]) -> np.ndarray:
    d = np.asarray(len_diff, dtype=float)
    sd = float(d.std()) if len(d) > 1 else 0.0
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Maximum-likelihood logit P(y) = b0 + b1 x with fractional targets (ties = 0.5, quasi-binomial), by scipy's
    L-BFGS-B. A small ridge on b1 keeps a constant x (all lengths equal) identifiable; bounds of +-30 let a
    pure-win set saturate near 1 instead of diverging."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    X = np.column_stack([np.ones_like(x), x])

    def nll(b: np.ndarray) -> tuple[float, np.ndarray]:
        z = X @ b
        loss = -np.sum(y * log_expit(z) + (1 - y) * log_expit(-z)) + 0.5 * ridge * b[1] ** 2
        grad = X.T @ (expit(z) - y) + np.array([0.0, ridge * b[1]])
        return float(loss), grad

    res = minimize(nll, np.zeros(2), jac=True, method="L-BFGS-B", bounds=[(-30, 30), (-30, 30)],
                   options={"gtol": 1e-10, "maxiter": 500})
    return res.x


def lc_point(x: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        return float("nan")
    b = fit_logistic(x, y)
    return float(1.0 / (1.0 + np.exp(-b[0])))


def length_controlled_win_rate(outcomes: Sequence[Outcome], len_candidate: Sequence[float],
                               len_opponent: Sequence[float], n_boot: int = 300, seed: int = 0) -> Estimate:
    """Win-rate the candidate would have at equal answer length, with a bootstrap CI (refit per resample)."""
    keep = [i for i, o in enumerate(outcomes) if o != "unparsed"]
    y = np.array([SCORE[outcomes[i]] for i in keep], dtype=float)
    d = np.array([float(len_candidate[i]) - float(len_opponent[i]) for i in keep])
    x = length_feature(d)
    data = np.column_stack([x, y]) if len(keep) else np.zeros((0, 2))
    return bootstrap_ci(data, stat=lambda a: lc_point(a[:, 0], a[:, 1]), n_boot=n_boot, seed=seed)


def summarize(results: Sequence[PairResult], n_boot: int = 1000, seed: int = 0) -> dict:
    """Win-rate, LC win-rate, counts and position consistency for one (candidate, opponent) comparison."""
    outcomes = [r.outcome for r in results]
    counts = {k: sum(o == k for o in outcomes) for k in ("win", "tie", "loss", "unparsed")}
    return {
        "n": counts["win"] + counts["tie"] + counts["loss"],
        **counts,
        "win_rate": win_rate(outcomes, n_boot=n_boot, seed=seed).as_dict(),
        "lc_win_rate": length_controlled_win_rate(outcomes, [r.len_candidate for r in results],
                                                  [r.len_opponent for r in results],
                                                  n_boot=max(100, n_boot // 4), seed=seed).as_dict(),
        "position_consistency": position_consistency([r.consistent for r in results]).as_dict(),
        "mean_len_candidate": float(np.mean([r.len_candidate for r in results])) if results else float("nan"),
        "mean_len_opponent": float(np.mean([r.len_opponent for r in results])) if results else float("nan"),
    }
