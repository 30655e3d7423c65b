"""The `merge-search` stage: Ray Tune runs the trials (Optuna's multi-objective sampler suggests them), the Pareto
front is chosen on the dev split, and the front's best members and the references are re-scored on test.

Order of work, each step kept on disk so a killed run resumes where it was:
1. the references on dev (the instruct parent as loaded, the CPT model, the study's schedule, uniform t = 0.5):
   `references_dev.json`;
2. the search: Tune's experiment in `tune/search` (a rerun restores it: finished trials stay finished);
3. selection on dev, then the test split: `test_scores.json`;
4. the outputs: trials.jsonl, results.json, the front's table, the Pareto plot, report.md, best/.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from definemed.config import ConfigError
from definemed.io import atomic_write_json
from definemed.merge.run import node_ref
from definemed.merge.search.config import METRICS, MergeSearchConfig
from definemed.merge.search.pareto import dominates, pareto_front
from definemed.merge.search.space import REFERENCES

log = logging.getLogger(__name__)
EXPERIMENT = "search"
#: what every search is compared with; None is model_a as loaded (the instruct parent)
BASELINES: dict[str, dict[str, Any] | None] = {
    "instruct": None, "cpt": {"method": "slerp", "t": {"default": 1.0}}, **REFERENCES}


# ---------------------------------------------------------------- Ray tasks with one engine
def _prepare(cfg: MergeSearchConfig) -> dict[str, Any]:
    """Resolve both parents where the trials run and check they merge, before any trial starts."""
    from definemed.merge.validate import check_compatible
    from definemed.models import resolve_model

    path_a, path_b = resolve_model(cfg.model_a), resolve_model(cfg.model_b)
    c = check_compatible(cfg.model_a, path_a, cfg.model_b, path_b, filters=["self_attn", "mlp"])
    return {"path_a": path_a, "path_b": path_b, "layers": int(c["num_hidden_layers"])}


def _score_recipes(cfg: MergeSearchConfig, engine: dict, path_a: str, path_b: str, split,
                   recipes: dict[str, dict | None]) -> dict[str, dict]:
    """Score several recipes with one engine (None: model_a itself, scored before any merge replaces it)."""
    import gc

    from definemed.merge.search.trial import Engine

    eng = Engine(cfg, engine, path_a, path_b)
    out = {}
    try:
        for name, recipe in sorted(recipes.items(), key=lambda kv: kv[1] is not None):
            if recipe is not None:
                eng.load(recipe)
            out[name], _ = eng.score(split)
    finally:
        del eng
        gc.collect()
    return out


def trial_resources(cfg: MergeSearchConfig, engine) -> dict[str, float]:
    """Tune's resources of one trial actor: the configured CPUs and memory, and the engine's GPUs (the engine's
    device is resolved against the cluster, never this driver)."""
    r = cfg.resources_per_trial
    gpus = max(r.num_gpus, engine.tensor_parallel_size) if engine.accelerator == "gpu" else 0
    out = {"cpu": r.num_cpus, "gpu": gpus, **r.custom}
    if r.memory:
        out["memory"] = r.memory
    return out


def _remote(fn, cfg: MergeSearchConfig, engine):
    import ray

    r = trial_resources(cfg, engine)
    opts = {"num_cpus": r.pop("cpu"), "num_gpus": r.pop("gpu")}
    if "memory" in r:
        opts["memory"] = r.pop("memory")
    if r:
        opts["resources"] = r
    return ray.remote(max_retries=0, max_calls=1, **opts)(fn)


def _cached(path: Path, key: str, compute) -> dict:
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["scores"]
    scores = compute()
    atomic_write_json(path, {"key": key, "scores": scores})
    return scores


# ---------------------------------------------------------------- the search
def _sampler(cfg: MergeSearchConfig):
    import optuna

    from definemed.merge.search.sampler import NSGAII

    s = cfg.sampler
    if s.kind == "nsga2":
        return NSGAII(population_size=s.population_size, seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.population_size)


def _tune(cfg: MergeSearchConfig, out: Path, engine, prep: dict, dev) -> list[dict]:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from definemed.merge.search.space import DefineByRun
    from definemed.merge.search.trial import MergeTrial, search_metric

    res = trial_resources(cfg, engine)
    trainable = tune.with_resources(
        tune.with_parameters(MergeTrial, search=cfg, engine=engine.model_dump(),
                             path_a=prep["path_a"], path_b=prep["path_b"], dev=dev), res)
    storage = out / "tune"
    exp = storage / EXPERIMENT
    if tune.Tuner.can_restore(str(exp)):
        log.warning("merge-search: resuming the search in %s (finished trials are kept)", exp)
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
    else:
        searcher = OptunaSearch(space=DefineByRun(cfg.space), metric=[search_metric(o.metric) for o in cfg.objectives],
                                mode=[o.direction for o in cfg.objectives], sampler=_sampler(cfg))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=cfg.trials,
                                        max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(storage), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    rows = []
    for res_ in grid:
        m = res_.metrics or {}
        rows.append({"trial_id": m.get("trial_id") or Path(res_.path).name, "params": res_.config,
                     "status": "error" if res_.error else ("done" if "recipe" in m else "incomplete"),
                     "error": str(res_.error).splitlines()[0] if res_.error else None,
                     "recipe": m.get("recipe"), "metrics": {k: m.get(k) for k in METRICS},
                     "items": m.get("items"), "mergekit_yaml": m.get("mergekit_yaml"),
                     "merge_seconds": m.get("merge_seconds"), "score_seconds": m.get("score_seconds"),
                     "path": res_.path})
    rows.sort(key=lambda x: str(x["trial_id"]))
    return rows


# ---------------------------------------------------------------- selection
def objective_pairs(cfg: MergeSearchConfig) -> list[tuple[str, str]]:
    return [(o.metric, o.direction) for o in cfg.objectives]


def feasible(cfg: MergeSearchConfig, metrics: dict, parent: dict) -> bool:
    for c in cfg.constraints:
        v, ref = metrics.get(c.metric), parent.get(c.metric)
        if v is None or ref is None or math.isnan(v) or v > c.max_ratio * ref:
            return False
    return True


def rank(cfg: MergeSearchConfig, candidates: list[dict], study: dict) -> list[dict]:
    """Front members, best first: those that dominate the study's schedule on dev, then by distance to the
    utopia point (the best value of every objective), each objective scaled to [0, 1] over the candidates."""
    objs = objective_pairs(cfg)
    span = {}
    for m, _ in objs:
        vals = [c["metrics"][m] for c in candidates if c["metrics"].get(m) is not None
                and not math.isnan(c["metrics"][m])]
        span[m] = (min(vals), max(vals)) if vals else (0.0, 1.0)

    def dist(c):
        d = 0.0
        for m, mode in objs:
            lo, hi = span[m]
            v = c["metrics"].get(m)
            x = 1.0 if v is None or math.isnan(v) else (v - lo) / (hi - lo) if hi > lo else 0.0
            d += (x if mode == "min" else 1.0 - x) ** 2
        return math.sqrt(d)

    return sorted(candidates, key=lambda c: (not dominates(c["metrics"], study, objs), dist(c)))


def compare(cfg: MergeSearchConfig, cand: dict, ref: dict, n_boot: int = 1000) -> dict:
    """Candidate vs reference on one split, per objective: the paired difference with its CI; `dominates` when
    no objective is worse (point estimate) or unknown, and at least one is better beyond its CI."""
    from definemed.merge.search.score import paired_difference

    per, no_worse, better = {}, True, []
    for m, mode in objective_pairs(cfg):
        d = paired_difference(m, cand["items"][m], ref["items"][m], n_boot=n_boot)
        sign = 1 if mode == "max" else -1
        # nan: one of the two has nothing to score (e.g. no German line for LPR), so "no worse" is unknown
        unknown = math.isnan(d["value"])
        worse = unknown or sign * d["value"] < 0
        beyond = not unknown and ((d["lo"] > 0) if mode == "max" else (d["hi"] < 0))
        per[m] = {**d, "worse": bool(worse and not unknown), "unknown": unknown, "better_beyond_ci": bool(beyond)}
        no_worse &= not worse
        if beyond:
            better.append(m)
    return {"per_objective": per, "dominates": bool(no_worse and better), "better_beyond_ci": better}


# ---------------------------------------------------------------- the stage
def run(cfg: MergeSearchConfig) -> dict[str, str]:
    import ray

    from definemed.merge.search.data import load_split
    from definemed.merge.search.report import write_outputs

    out = Path(cfg.output_dir).resolve()
    engine = cfg.scoring.engine.resolve()
    try:
        custom = cfg.resources_per_trial.custom  # a node that reaches the checkpoints
        prep = ray.get(ray.remote(max_retries=0, num_cpus=1, **({"resources": custom} if custom else {}))(_prepare)
                       .remote(cfg))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ConfigError):
            raise e.cause from None
        raise
    dev, test = load_split(cfg.scoring, "dev"), load_split(cfg.scoring, "test")
    # what trials and scoring tasks get: validated here, with local model paths made absolute (Tune runs a trial
    # in its own directory)
    search = cfg.model_copy(update={"model_a": node_ref(cfg.model_a), "model_b": node_ref(cfg.model_b)})
    task = _remote(_score_recipes, cfg, engine)
    key = json.dumps([cfg.model_a, cfg.model_b, cfg.scoring.model_dump(mode="json"), dev.describe(), BASELINES],
                     sort_keys=True)
    log.info("merge-search: scoring the instruct parent, the CPT model, the study's schedule and uniform t = 0.5 "
             "on dev")
    ref_dev = _cached(out / "references_dev.json", key, lambda: ray.get(task.remote(
        search, engine.model_dump(), prep["path_a"], prep["path_b"], dev, BASELINES)))
    rows = _tune(search, out, engine, prep, dev)
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        raise RuntimeError(f"merge-search: none of {len(rows)} trials finished; see {out / 'tune' / EXPERIMENT}")
    parent = ref_dev["instruct"]["metrics"]
    for r in rows:
        r["feasible"] = r["status"] == "done" and feasible(cfg, r["metrics"], parent)
    pool = [r for r in rows if r["feasible"]]
    objs = objective_pairs(cfg)
    front = [pool[i] for i in pareto_front([r["metrics"] for r in pool], objs)]
    ranked = rank(cfg, front, ref_dev["study"]["metrics"])
    for i, r in enumerate(ranked):
        r["front_rank"] = i + 1
    chosen = ranked[:cfg.rescore_top]
    recipes = {**BASELINES, **{f"trial:{r['trial_id']}": r["recipe"] for r in chosen}}
    key_t = json.dumps([key, test.describe(), recipes], sort_keys=True)
    log.info("merge-search: re-scoring the %d best of %d front members and the references on test", len(chosen),
             len(front))
    ref_test = _cached(out / "test_scores.json", key_t, lambda: ray.get(task.remote(
        search, engine.model_dump(), prep["path_a"], prep["path_b"], test, recipes)))
    return write_outputs(cfg, out, rows, ranked, ref_dev, ref_test, prep, dev, test)
