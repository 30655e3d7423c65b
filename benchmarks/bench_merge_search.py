"""Trials per hour of the merge search against the naive loop, side by side on the same recipes and dev split.

    python benchmarks/bench_merge_search.py [--config configs/real-instruct-search.yaml] [--trials 4]

- naive (the baseline the issue names): per trial, merge to disk with mergekit's `run_merge` into a temporary
  directory, start a fresh vLLM engine on it in a fresh process, score the dev split, remove the directory;
- search: what a merge-search trial does: one engine built once, each trial merged in memory into it
  (`definemed/merge/search/inplace.py`) and scored.

Both arms run as Ray tasks with the config's `resources_per_trial`, one after the other, and score the same
seeded recipes (Optuna's sampler is not involved: its cost is the same in both). The first trial of the search
arm pays for building the engine, as a real search does. Prints trials/hour of each, the ratio (target >= 2x) and
the load average before and after each arm; numbers taken at a load average above 2 are provisional.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def recipes(cfg, n: int, seed: int = 0) -> list[dict]:
    import optuna

    from definemed.merge.search.space import DefineByRun, recipe

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        t = study.ask()
        DefineByRun(cfg.space)(t)
        out.append(recipe(t.params, cfg.space.knots))
    return out


def naive_trial(cfg, engine: dict, path_a: str, path_b: str, split, rec: dict) -> float:
    """Merge to disk, fresh engine, score, clean up (a Ray task with max_calls=1: a fresh process per trial)."""
    import gc

    from mergekit.merge import MergeOptions, run_merge

    from definemed.engine import EngineConfig, make_llm
    from definemed.merge.run import copy_tokenizer
    from definemed.merge.search.score import score_engine
    from definemed.merge.search.trial import mergekit_of

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="naive-merge-"))
    try:
        mk, _ = mergekit_of(cfg, rec, path_a, path_b)
        from mergekit.config import MergeConfiguration

        run_merge(MergeConfiguration.model_validate(mk), str(tmp), options=MergeOptions(
            random_seed=0, copy_tokenizer=False, write_model_card=False))
        copy_tokenizer(path_a, tmp)
        llm = make_llm(str(tmp), EngineConfig(**engine), sole_engine=True)
        score_engine(llm, split, cfg.scoring)
        del llm
        gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - t0


def search_arm(cfg, engine: dict, path_a: str, path_b: str, split, recs: list[dict]) -> list[float]:
    from definemed.merge.search.trial import Engine

    t0 = time.perf_counter()
    eng = Engine(cfg, engine, path_a, path_b)
    start = time.perf_counter() - t0
    times = []
    for i, r in enumerate(recs):
        t1 = time.perf_counter()
        eng.load(r)
        eng.score(split)
        times.append(time.perf_counter() - t1 + (start if i == 0 else 0.0))
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/merge-search.yaml")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--out", default="outputs/bench/merge_search.json")
    args = ap.parse_args()

    import ray

    from definemed.config import load_config
    from definemed.merge.search.config import MergeSearchConfig
    from definemed.merge.search.data import load_split
    from definemed.merge.search.run import _prepare, _remote, node_ref
    from definemed.ray_utils import init_ray

    cfg = load_config(MergeSearchConfig, args.config)
    init_ray(cfg.ray)
    cfg = cfg.model_copy(update={"model_a": node_ref(cfg.model_a), "model_b": node_ref(cfg.model_b)})
    engine = cfg.scoring.engine.resolve()
    prep = ray.get(ray.remote(num_cpus=1)(_prepare).remote(cfg))
    dev = load_split(cfg.scoring, "dev")
    recs = recipes(cfg, args.trials)
    rows = {}
    for arm in ("naive", "search"):
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        if arm == "naive":
            task = _remote(naive_trial, cfg, engine)
            times = [ray.get(task.remote(cfg, engine.model_dump(), prep["path_a"], prep["path_b"], dev, r))
                     for r in recs]
        else:
            times = ray.get(_remote(search_arm, cfg, engine).remote(cfg, engine.model_dump(), prep["path_a"],
                                                                    prep["path_b"], dev, recs))
        wall = time.perf_counter() - t0
        rows[arm] = {"trials": len(recs), "wall_s": round(wall, 1), "per_trial_s": [round(t, 1) for t in times],
                     "trials_per_hour": round(3600 * len(recs) / wall, 1), "load_before": round(load0, 2),
                     "load_after": round(os.getloadavg()[0], 2)}
        print(f"{arm:>6}: {len(recs)} trials in {wall:.0f} s = {rows[arm]['trials_per_hour']:.0f} trials/h "
              f"(per trial {rows[arm]['per_trial_s']}; load average {load0:.2f} -> {rows[arm]['load_after']:.2f})",
              flush=True)
    ratio = rows["search"]["trials_per_hour"] / rows["naive"]["trials_per_hour"]
    busy = max(r["load_before"] for r in rows.values()) >= 2
    print(f"search / naive: {ratio:.2f}x trials per hour (target >= 2x)"
          + ("  [load average >= 2 at a start: provisional]" if busy else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "models": [cfg.model_a, cfg.model_b],
                                          "arms": rows, "ratio": round(ratio, 2)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
