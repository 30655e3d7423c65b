"""merge-search: Pareto selection, the search space, paired comparisons, config errors (unit); a 4-trial search on
tiny models whose chosen recipe `mergekit-yaml` reproduces bit for bit, and a search killed midway that resumes
without rerunning its finished trials (integration)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
OBJS = [("ppl_medical", "min"), ("if_de_gated", "max")]


# ---------------------------------------------------------------- Pareto
def test_pareto_front_on_a_hand_made_set():
    from definemed.merge.search.pareto import dominates, pareto_front

    pts = [
        {"ppl_medical": 10.0, "if_de_gated": 0.5},   # 0 front
        {"ppl_medical": 12.0, "if_de_gated": 0.6},   # 1 front: worse ppl, better IF
        {"ppl_medical": 11.0, "if_de_gated": 0.4},   # 2 dominated by 0
        {"ppl_medical": 10.0, "if_de_gated": 0.5},   # 3 a duplicate of 0: neither dominates, both stay
        {"ppl_medical": 13.0, "if_de_gated": 0.6},   # 4 dominated by 1 (equal IF, worse ppl)
        {"ppl_medical": math.nan, "if_de_gated": 0.9},  # 5 unscored ppl counts as worst, but nobody has its IF
        {"ppl_medical": 9.0},                          # 6 missing IF counts as worst; best ppl keeps it on
        {"ppl_medical": math.nan, "if_de_gated": 0.1},  # 7 dominated by everything scored with more IF
    ]
    assert pareto_front(pts, OBJS) == [0, 1, 3, 5, 6]
    assert dominates(pts[0], pts[2], OBJS) and not dominates(pts[2], pts[0], OBJS)
    assert not dominates(pts[0], pts[3], OBJS)
    # with a third objective the dominated point can come back
    pts3 = [{**p, "lpr_de": 1.0 if i == 2 else 0.0} for i, p in enumerate(pts)]
    assert 2 in pareto_front(pts3, OBJS + [("lpr_de", "max")])
    with pytest.raises(ValueError):
        pareto_front(pts, [])


def test_rank_prefers_members_that_dominate_the_study_then_the_utopia_distance():
    from definemed.merge.search.config import MergeSearchConfig
    from definemed.merge.search.run import rank

    cfg = MergeSearchConfig.model_validate(_config("/tmp/unused", objectives=[
        {"metric": "ppl_medical"}, {"metric": "if_de_gated"}]))
    study = {"ppl_medical": 10.0, "if_de_gated": 0.3}
    front = [{"id": "a", "metrics": {"ppl_medical": 8.0, "if_de_gated": 0.2}},   # closer to utopia, not dominating
             {"id": "b", "metrics": {"ppl_medical": 9.5, "if_de_gated": 0.35}},  # dominates the study
             {"id": "c", "metrics": {"ppl_medical": 12.0, "if_de_gated": 0.6}}]
    assert [c["id"] for c in rank(cfg, front, study)] == ["b", "a", "c"]


def test_dev_test_split_of_a_packs_held_out_documents_is_not_one_sided():
    from definemed.train.split import dev_test_split as split_documents
    from definemed.train.split import is_heldout

    # exactly what the pack stage holds out (the same seed): the search's own split must not depend on that hash
    held = [(f"doc-{i}", "text") for i in range(2000) if is_heldout(f"doc-{i}", 0.15, 0)]
    dev, test = split_documents(held, 0, "dev", 10_000), split_documents(held, 0, "test", 10_000)
    assert abs(len(dev) - len(test)) < 0.25 * len(held) and not {i for i, _ in dev} & {i for i, _ in test}
    assert len(dev) + len(test) == len(held)
    assert split_documents(held, 0, "dev", 5) == dev[:5]  # a larger n keeps the smaller split's documents


# ---------------------------------------------------------------- space and recipes
def test_define_by_run_space_and_recipe_follow_the_method():
    import optuna

    from definemed.merge.config import MergeStageConfig
    from definemed.merge.search.config import SearchSpace
    from definemed.merge.search.space import DefineByRun, recipe

    space = SearchSpace(methods=["slerp", "ties"], knots=3)
    params = {"method": "ties", "granularity": "component", "t_default": 0.4, "density": 0.3,
              **{f"self_attn_{k}": 0.1 * k for k in range(3)}, **{f"mlp_{k}": 1 - 0.1 * k for k in range(3)}}
    trial = optuna.trial.FixedTrial(params)
    DefineByRun(space)(trial)  # suggests exactly these names (FixedTrial raises on an unknown one)
    r = recipe(params, 3)
    assert r == {"method": "ties", "t": {"self_attn": [0.0, 0.1, 0.2], "mlp": [1.0, 0.9, 0.8], "default": 0.4},
                 "density": 0.3}
    MergeStageConfig(output_dir="x", model_a="tiny://qwen2", model_b="tiny://qwen2@1", **r)  # a valid merge config
    slerp = recipe({"method": "slerp", "granularity": "uniform", "t_default": 0.7}, 3)
    assert slerp == {"method": "slerp", "t": {"default": 0.7}}
    # the searcher is pickled into Tune's experiment checkpoint: the space must survive it
    import pickle

    assert pickle.loads(pickle.dumps(DefineByRun(space))).space == space


def test_the_search_state_survives_pickle_as_tune_checkpoints_it():
    import pickle

    from definemed.merge.search.sampler import NSGAII

    s = NSGAII(population_size=4, seed=3)
    assert hasattr(s, "_thread_lock"), "optuna renamed the lock: update definemed/merge/search/sampler.py"
    s2 = pickle.loads(pickle.dumps(s))
    assert s2._population_size == 4 and hasattr(s2, "_thread_lock")


# ---------------------------------------------------------------- paired comparisons
def test_compare_needs_no_worse_everywhere_and_better_beyond_the_ci():
    from definemed.merge.search.config import MergeSearchConfig
    from definemed.merge.search.run import compare
    from definemed.merge.search.score import paired_difference, value

    cfg = MergeSearchConfig.model_validate(_config("/tmp/unused", objectives=[
        {"metric": "ppl_medical"}, {"metric": "if_de_gated"}]))
    docs = [[100.0, 50], [120.0, 60], [90.0, 40], [110.0, 50]]
    study = {"items": {"ppl_medical": docs, "if_de_gated": [[0.0]] * 20}}
    better_if = {"items": {"ppl_medical": docs, "if_de_gated": [[1.0]] * 12 + [[0.0]] * 8}}
    c = compare(cfg, better_if, study)
    assert c["dominates"] and c["better_beyond_ci"] == ["if_de_gated"]
    assert c["per_objective"]["ppl_medical"]["value"] == 0.0
    worse_ppl = {"items": {"ppl_medical": [[a + 5, n] for a, n in docs], "if_de_gated": better_if["items"]["if_de_gated"]}}
    c2 = compare(cfg, worse_ppl, study)
    assert not c2["dominates"] and c2["per_objective"]["ppl_medical"]["worse"]
    # token-weighted perplexity, not a mean of per-document perplexities
    assert value("ppl_medical", docs) == pytest.approx(math.exp(420 / 200))
    assert math.isnan(value("lpr_de", [[math.nan], [math.nan]]))
    with pytest.raises(ValueError, match="different items"):
        paired_difference("if_de_gated", [[1.0]] * 3, [[1.0]] * 4)


# ---------------------------------------------------------------- config errors
def _config(out: str, **over) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "merge-search.yaml").read_text())
    cfg["output_dir"] = out
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("change,field", [
    ({"space": {"methods": ["slerp", "task_magic"]}}, "space.methods.1"),
    ({"space": {"t": {"low": 0.0, "high": 1.5}}}, "space.t"),
    ({"objectives": [{"metric": "ppl_medical"}, {"metric": "bleu"}]}, "objectives.1.metric"),
])
def test_a_bad_search_space_exits_2_with_one_line(tmp_path, change, field):
    from typer.testing import CliRunner

    from definemed.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_config(str(tmp_path / "out"), **change)))
    res = CliRunner().invoke(app, ["merge-search", "--config", str(bad)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and f"invalid config field '{field}'" in lines[0], res.output
    assert not (tmp_path / "out").exists()  # nothing ran


def test_shipped_search_configs_validate():
    from definemed.merge.search.config import MergeSearchConfig

    for f in ("configs/merge-search.yaml", "configs/real-instruct-search.yaml", "configs/cluster/merge-search.yaml"):
        data = yaml.safe_load((REPO / f).read_text())
        # the real-instruct CPT model and the cluster's volumes do not exist here: check as `definemed plan` does
        cfg = MergeSearchConfig.model_validate(data, context={"plan_only": True})
        assert cfg.trials >= (24 if "real-instruct" in f else 100 if "cluster" in f else 4)


# ---------------------------------------------------------------- a search on tiny models (integration)
def _run(cfg_path: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "definemed.cli", "merge-search", "--config", str(cfg_path)],
                          cwd=REPO, capture_output=True, text=True, **kw)


@pytest.mark.integration
def test_four_trial_search_selects_on_dev_reports_test_and_mergekit_reproduces_the_best(tmp_path):
    import torch
    from safetensors.torch import load_file

    from definemed.merge.search.inplace import merged_tensors
    from definemed.models import resolve_model

    out = tmp_path / "search"
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(_config(str(out))))
    r = _run(cfg, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    trials = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 4 and all(t["status"] == "done" for t in trials)
    for t in trials:  # every trial records its parameters, its metrics and the mergekit YAML that makes it
        assert t["params"]["method"] in ("slerp", "linear", "ties", "dare_ties") and t["mergekit_yaml"]
        assert all(isinstance(t["metrics"][m], float) for m in ("ppl_medical", "ppl_general", "if_en"))
    # the front is chosen on dev, and its members and the references are re-scored on test: disjoint items
    assert 1 <= len(res["front"]) <= 4
    dev, test = res["splits"]["dev"], res["splits"]["test"]
    assert not set(dev["prompts"]) & set(test["prompts"])
    assert not set(dev["documents"]["medical"]) & set(test["documents"]["medical"])
    assert {"instruct", "cpt", "study", "uniform-0.5"} <= set(res["test"])
    assert "dominate" in res["verdict"] and (out / "pareto.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "| study | test |" in report and "Verdict (test split)" in report
    # the chosen recipe as a merge-stage config, and as a mergekit YAML that mergekit-yaml reproduces exactly
    merge_cfg = yaml.safe_load((out / "best" / "merge.yaml").read_text())
    assert merge_cfg["model_a"] == "tiny://qwen2" and merge_cfg["method"] == res["best"]["recipe"]["method"]
    mk_yaml = out / "best" / "mergekit.yaml"
    made = tmp_path / "mergekit-out"
    mk = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(mk_yaml), str(made),
                         "--random-seed", "0", "--no-copy-tokenizer"], capture_output=True, text=True, timeout=600)
    assert mk.returncode == 0, mk.stderr[-2000:]
    on_disk = {}
    for f in made.glob("*.safetensors"):
        on_disk.update(load_file(f))
    in_memory = dict(merged_tensors(yaml.safe_load(mk_yaml.read_text())))
    assert set(in_memory) == set(on_disk) and in_memory
    for name, t in in_memory.items():
        assert torch.equal(t.to(on_disk[name].dtype), on_disk[name]), name
    # and it differs from both parents (it is a merge, not a copy)
    a = load_file(Path(resolve_model("tiny://qwen2")) / "model.safetensors")
    assert any(not torch.equal(on_disk[n].float(), a[n].float()) for n in on_disk if n in a)


@pytest.mark.integration
def test_search_killed_midway_resumes_without_rerunning_finished_trials(tmp_path):
    out = tmp_path / "search"
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(_config(str(out), trials=10)))
    exp = out / "tune" / "search"

    def finished() -> set[str]:
        return {p.parent.name for p in exp.glob("*/result.json") if p.read_text().strip()}

    p = subprocess.Popen([sys.executable, "-m", "definemed.cli", "merge-search", "--config", str(cfg)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        # trials run one at a time: when the 4th trial's directory exists, three have finished (result.json is
        # written through a buffered logger, so its content is no timely signal)
        while len(list(exp.glob("MergeTrial_*"))) < 4 and time.time() < deadline and p.poll() is None:
            time.sleep(1)
        assert p.poll() is None, "the search ended before it could be killed"
        os.killpg(p.pid, signal.SIGKILL)  # a real kill of the driver and everything it started
        p.wait(30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    started = len(list(exp.glob("MergeTrial_*")))
    first = finished()
    assert 4 <= started < 10 and len(first) < 10
    before = {d: (exp / d / "result.json").read_text() for d in first}
    r = _run(cfg, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming the search" in r.stderr
    trials = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 10 and all(t["status"] == "done" for t in trials)
    for d, text in before.items():  # finished trials were not run again: their results are untouched
        assert (exp / d / "result.json").read_text() == text


def test_plan_books_trials_times_resources_per_trial():
    from definemed.merge.search.config import MergeSearchConfig
    from definemed.plan.project import config_work
    from definemed.plan.requests import stage_requests

    data = yaml.safe_load((REPO / "configs" / "cluster" / "merge-search.yaml").read_text())
    cfg = MergeSearchConfig.model_validate(data, context={"plan_only": True})
    req = stage_requests("merge-search", cfg, {"CPU": 384, "GPU": 32}).requests[0]
    assert (req.min_units, req.max_units, req.gpus_per_unit, req.per_unit("CPU")) == (1, 4, 1.0, 8.0)
    assert "a100_40gb" in req.node_types
    assert config_work("merge-search", cfg) == (100.0, "trials", "config trials")
    # on a CPU-only cluster the engine resolves to CPU: no GPU is booked, whatever the driver has
    cpu = stage_requests("merge-search", MergeSearchConfig.model_validate(
        yaml.safe_load((REPO / "configs" / "merge-search.yaml").read_text()), context={"plan_only": True}),
        {"CPU": 8}).requests[0]
    assert cpu.gpus_per_unit == 0 and cpu.per_unit("CPU") == 1.0
