"""The search space as an Optuna define-by-run function, and a trial's parameters as a merge recipe.

A recipe is what the `merge` stage takes (method, t schedule, density), so a chosen trial flows into the merge
stage, serve and eval unchanged. Conditional parameters (density only for ties / dare_ties, knots only at
component granularity) are what a define-by-run space is for; Optuna's samplers handle them.
"""
from __future__ import annotations

from typing import Any

from definemed.merge.config import DEFAULT_KEY, STUDY_SCHEDULE
from definemed.merge.search.config import SearchSpace

COMPONENTS = ("self_attn", "mlp")


class DefineByRun:
    """Suggests one recipe's parameters on an Optuna trial (Ray Tune's OptunaSearch calls it). A class, not a
    closure: Tune pickles the searcher, this included, into the experiment checkpoint that a resumed search
    restores."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> None:
        space = self.space
        method = trial.suggest_categorical("method", list(space.methods))
        granularity = trial.suggest_categorical("granularity", list(space.granularity))
        if granularity == "component":
            for comp in COMPONENTS:
                for k in range(space.knots):
                    trial.suggest_float(f"{comp}_{k}", space.t.low, space.t.high)
        trial.suggest_float("t_default", space.t.low, space.t.high)
        if method in ("ties", "dare_ties"):
            trial.suggest_float("density", space.density.low, space.density.high)


def recipe(params: dict[str, Any], knots: int) -> dict[str, Any]:
    """Trial parameters -> merge-stage fields (method, t, density)."""
    t: dict[str, Any] = {}
    if params.get("granularity", "component") == "component":
        for comp in COMPONENTS:
            vals = [round(float(params[f"{comp}_{k}"]), 6) for k in range(knots)]
            t[comp] = vals if len(vals) > 1 else vals[0]
    t[DEFAULT_KEY] = round(float(params["t_default"]), 6)
    out: dict[str, Any] = {"method": params["method"], "t": t}
    if params["method"] in ("ties", "dare_ties"):
        out["density"] = round(float(params["density"]), 6)
    return out


#: The two references every search is compared with: the study's hand-made schedule and uniform t = 0.5.
REFERENCES: dict[str, dict[str, Any]] = {
    "study": {"method": "slerp", "t": dict(STUDY_SCHEDULE)},
    "uniform-0.5": {"method": "slerp", "t": {DEFAULT_KEY: 0.5}},
}
