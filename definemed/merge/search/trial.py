"""One search trial as a Ray Tune Trainable: merge the trial's recipe in memory into the actor's one engine and
score it on the dev split.

The engine is built once per actor from model_a (the instruct parent; every merge has its architecture) and Tune
reuses the actor for later trials (`reset_config` returns True), so a trial costs one in-memory merge and one
scoring pass, not a model written to disk and an engine started. Each reported result carries the recipe, the
mergekit YAML that reproduces it and the per-item scores.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

from ray import tune

from definemed.merge.search.config import METRICS, MergeSearchConfig

#: what Optuna sees: the metric, with nan (a model that produced nothing to score) as the worst value, because
#: Optuna fails a trial that reports nan and a failed trial teaches the sampler nothing
WORST = {"min": 1e9, "max": -1e9}


def search_metric(name: str) -> str:
    return f"search_{name}"


def search_values(cfg: MergeSearchConfig, metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for o in cfg.objectives:
        v = metrics.get(o.metric, math.nan)
        out[search_metric(o.metric)] = WORST[o.direction] if v is None or math.isnan(v) else v
    return out


def merge_config(cfg: MergeSearchConfig, recipe: dict[str, Any], output_dir: str):
    """The merge stage's config for a recipe (so every recipe is validated as the merge stage would)."""
    from definemed.merge.config import MergeStageConfig

    return MergeStageConfig(output_dir=output_dir, model_a=cfg.model_a, model_b=cfg.model_b, dtype=cfg.dtype,
                            **recipe)


def mergekit_of(cfg: MergeSearchConfig, recipe: dict[str, Any], path_a: str, path_b: str) -> tuple[dict, str]:
    from definemed.merge.methods import to_mergekit

    mk = to_mergekit(merge_config(cfg, recipe, "unused"), path_a, path_b, cfg.dtype)
    return mk.model_dump(mode="json", exclude_none=True), mk.to_yaml()


class Engine:
    """model_a's engine, whose weights each recipe replaces in turn."""

    def __init__(self, cfg: MergeSearchConfig, engine: dict, path_a: str, path_b: str):
        from definemed.engine import EngineConfig, engine_device, make_llm

        self.cfg, self.path_a, self.path_b = cfg, path_a, path_b
        ecfg = EngineConfig(**engine)
        self.device = engine_device(ecfg)
        # on GPU the engine's worker is another process: apply_model pickles the merge function and its config
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.llm = make_llm(path_a, ecfg, sole_engine=True)
        self.holds = "model_a"

    def load(self, recipe: dict[str, Any]) -> tuple[str, float]:
        from definemed.merge.search.inplace import load_merge

        mk, yaml = mergekit_of(self.cfg, recipe, self.path_a, self.path_b)
        t0 = time.perf_counter()
        load_merge(self.llm, mk, device="cuda" if self.device == "gpu" else "cpu", seed=0)
        self.holds = "merge"
        return yaml, time.perf_counter() - t0

    def score(self, split) -> tuple[dict[str, Any], float]:
        from definemed.merge.search.score import score_engine

        t0 = time.perf_counter()
        return score_engine(self.llm, split, self.cfg.scoring), time.perf_counter() - t0


class MergeTrial(tune.Trainable):
    """A trial: params (Optuna's suggestion) -> recipe -> in-memory merge -> dev scores. One step, then done."""

    def setup(self, config: dict, search: MergeSearchConfig, engine: dict, path_a: str, path_b: str, dev) -> None:
        self.search = search  # validated by the driver (Tune runs a trial in its own directory)
        self.dev = dev
        self.engine = Engine(self.search, engine, path_a, path_b)

    def step(self) -> dict:
        from definemed.merge.search.space import recipe as to_recipe

        recipe = to_recipe(self.config, self.search.space.knots)
        yaml, merge_s = self.engine.load(recipe)
        scored, score_s = self.engine.score(self.dev)
        m = scored["metrics"]
        return {**{k: m.get(k) for k in METRICS}, **search_values(self.search, m), "recipe": recipe,
                "mergekit_yaml": yaml, "items": scored["items"], "answers": scored["answers"],
                "merge_seconds": merge_s, "score_seconds": score_s, "done": True}

    # One step and done: a trial has no state worth a checkpoint (Tune asks for one when a trial ends).
    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        return {}

    def load_checkpoint(self, checkpoint) -> None:
        pass

    def reset_config(self, new_config: dict) -> bool:
        self.config = new_config
        return True  # the engine stays; the next step replaces its weights

    def cleanup(self) -> None:
        import gc

        self.engine = None
        gc.collect()
