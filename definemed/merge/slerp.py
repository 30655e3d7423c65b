"""SLERP (the study's method): spherical interpolation from model_a (t = 0) to model_b (t = 1) per tensor."""
from __future__ import annotations

from definemed.merge.schedule import conditional


def mergekit_config(cfg, path_a: str, path_b: str) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": path_a,  # mergekit's t = 0 endpoint
        "models": [{"model": path_a}, {"model": path_b}],
        "parameters": {"t": conditional(cfg.t)},
    }
