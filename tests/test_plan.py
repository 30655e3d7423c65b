"""`definemed plan` against cluster spec files (no Ray): fit, autoscaling bounds, projection, exit codes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from definemed.plan.cluster import Node
from definemed.plan.fit import fit_phase, place_unit
from definemed.plan.requests import Request

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs" / "cluster" / "a100-4node.yaml"
PIPELINE = REPO / "configs" / "cluster" / "pipeline.yaml"


def _nodes(*gpus_per_node, head_cpus=8) -> list[Node]:
    out = [Node("head", "head", True, {"CPU": float(head_cpus)})]
    out += [Node(f"w{i}", "gpu", False, {"CPU": 96.0, "GPU": float(g)}) for i, g in enumerate(gpus_per_node)]
    return out


def _req(key, bundles, strategy="PACK", lo=1, hi=1, phase="run"):
    return Request("s", key, key, bundles, strategy=strategy, min_units=lo, max_units=hi, phase=phase)


def test_tensor_parallel_group_needs_one_node():
    tp8 = [{"GPU": 1, "CPU": 1}] * 8
    assert place_unit(_nodes(8), tp8, "STRICT_PACK") is not None
    assert place_unit(_nodes(4, 4), tp8, "STRICT_PACK") is None  # 8 GPUs in all, but no node holds 8
    assert place_unit(_nodes(4, 4), tp8, "PACK") is not None  # PACK may split


def test_gpu_work_never_lands_on_the_head_and_cpu_work_may():
    nodes = _nodes(8, 8, head_cpus=64)
    pf = fit_phase(nodes, [_req("gpu", [{"GPU": 1, "CPU": 1}], "SPREAD", 16, 16),
                           _req("cpu", [{"CPU": 1}], "SPREAD", 8, 8)], "run")
    assert pf.fits
    assert all(node != "head" for unit in pf.placements["gpu"] for node in unit)
    assert not fit_phase(nodes, [_req("gpu", [{"GPU": 1}], "SPREAD", 17, 17)], "run").fits


def test_autoscaled_request_grows_into_what_is_left():
    nodes = _nodes(8, 8)
    pf = fit_phase(nodes, [_req("train", [{"GPU": 1}], lo=10, hi=10), _req("engine", [{"GPU": 2}], lo=1, hi=8)],
                   "run")
    assert pf.fits and pf.units == {"train": 10, "engine": 3}  # 16 - 10 GPUs = 3 engines of 2


def _plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "definemed.cli", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_plan_of_the_study_on_four_a100_nodes(tmp_path):
    out = tmp_path / "plan.json"
    r = _plan("--config", str(PIPELINE), "--cluster-spec", str(SPEC), "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    for stage in yaml.safe_load(PIPELINE.read_text())["stages"]:
        assert f"\n{stage} " in text, stage
    assert "plan fits" in text and "GPU-h" in text
    import json

    rep = json.loads(out.read_text())
    by = {s["stage"]: s for s in rep["stages"]}
    ann = {q["key"]: q for q in by["annotate"]["requests"]}["engine"]
    cfg = yaml.safe_load((REPO / "configs" / "cluster" / "annotate.yaml").read_text())
    assert (ann["min_units"], ann["max_units"]) == (cfg["min_replicas"], cfg["max_replicas"])  # the bounds
    assert ann["strategy"] == "STRICT_PACK" and ann["gpus_per_unit"] == cfg["engine"]["tensor_parallel_size"]
    # Every projection states its inputs: the amount of work, the rate and where both come from.
    cpt = by["cpt"]["projection"]["inputs"]
    assert "config max_steps x global_batch_tokens" in cpt and "tokens/s per gpu" in cpt and "assumed" in cpt
    assert by["cpt"]["projection"]["gpu_h"] == pytest.approx(by["cpt"]["projection"]["wall_h"] * 32)


def test_plan_exits_nonzero_when_the_cluster_is_too_small(tmp_path):
    spec = yaml.safe_load(SPEC.read_text())
    spec["nodes"][1]["count"] = 2  # 16 GPUs: CPT's 32 workers cannot start
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(spec))
    r = _plan("--config", str(PIPELINE), "--cluster-spec", str(small))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DOES NOT FIT: cpt" in r.stdout and "plan does not fit" in r.stdout
    assert "DOES NOT FIT: annotate" not in r.stdout  # annotate autoscales: it starts with its minimum


def test_plan_rejects_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "cpt.yaml"
    bad.write_text("output_dir: o\nmodel: m\npacked: p\ntrain: {max_steps: 1, global_batch_tokens: 100}\n"
                   "parallel: {num_workerz: 2}\n")
    r = _plan("--config", str(bad), "--stage", "cpt", "--cluster-spec", str(SPEC))
    assert r.returncode == 2 and "parallel.num_workerz" in r.stderr
