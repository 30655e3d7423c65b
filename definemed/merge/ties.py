"""TIES: model_a + t * trim(model_b - model_a). With one task vector, TIES' sign election keeps every kept
entry, so `density` (largest-magnitude fraction kept) is what differs from linear. normalize is off: with a
single model mergekit would divide the weight back out and t would do nothing."""
from __future__ import annotations

from definemed.merge.schedule import conditional

DEFAULT_DENSITY = 0.5


def mergekit_config(cfg, path_a: str, path_b: str, method: str = "ties") -> dict:
    density = cfg.density if cfg.density is not None else DEFAULT_DENSITY
    return {
        "merge_method": method,
        "base_model": path_a,
        "models": [{"model": path_b, "parameters": {"weight": conditional(cfg.t), "density": density}}],
        "parameters": {"normalize": False},
    }
