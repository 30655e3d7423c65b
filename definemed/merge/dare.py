"""DARE-TIES: model_a + t * dare(model_b - model_a): random drop of (1 - density) of the task vector, the rest
rescaled. Reproducible through `seed` (mergekit's random_seed)."""
from __future__ import annotations

from definemed.merge import ties


def mergekit_config(cfg, path_a: str, path_b: str) -> dict:
    return ties.mergekit_config(cfg, path_a, path_b, method="dare_ties")
