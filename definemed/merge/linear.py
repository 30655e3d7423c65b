"""Linear: (1 - t) * model_a + t * model_b, the schedule read as model_b's weight (ablation baseline)."""
from __future__ import annotations

from definemed.merge.schedule import conditional


def mergekit_config(cfg, path_a: str, path_b: str) -> dict:
    return {
        "merge_method": "linear",
        "base_model": path_a,  # linear ignores it for the math; it fixes the output config to model_a's
        "models": [
            {"model": path_a, "parameters": {"weight": conditional(cfg.t, lambda x: round(1.0 - x, 12))}},
            {"model": path_b, "parameters": {"weight": conditional(cfg.t)}},
        ],
        "parameters": {"normalize": True},
    }
