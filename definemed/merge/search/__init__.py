"""The `merge-search` stage: a multi-objective search over merge recipes on Ray Tune (Optuna's samplers)."""
