"""The cluster shape, tested on this CPU machine with Ray's logical resources.

A simulated multi-node cluster of real `ray start` processes on loopback: a head with no GPU (like the KubeRay head
in infra/k8s/raycluster.yaml) and two worker nodes that advertise 16 logical GPUs each plus the accelerator
resources the cluster configs use. `definemed plan --reserve` plans every stage of configs/cluster/pipeline.yaml
(its paths swapped for small local ones) against it, then creates the real placement groups and schedules a trivial
actor into each; no CUDA runs. What each stage should ask for is read here from the YAML files directly, not from
definemed, so a stage that asks the cluster for the wrong device fails this test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ray_cluster import RayNodes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "configs" / "cluster" / "pipeline.yaml"
WORKER_GPUS = 16
WORKER_RESOURCES = {"accelerator_type:A100": WORKER_GPUS, "a100_40gb": WORKER_GPUS}


@pytest.fixture(scope="module")
def sim_cluster(tmp_path_factory):
    nodes = RayNodes(tmp_path_factory.mktemp("simcluster"), "dmplan")
    try:
        # The head has CPUs but no GPU: work asked for as CPU could land there, GPU work never can.
        nodes.start_head(num_cpus=8, num_gpus=0, object_store_bytes=150 * 2**20)
        for _ in range(2):
            nodes.add_worker(num_cpus=144, num_gpus=WORKER_GPUS, memory_bytes=2**40, resources=WORKER_RESOURCES,
                             object_store_bytes=150 * 2**20)
        yield nodes
    finally:
        nodes.stop()


def _localize(value, root: Path):
    """Cluster paths -> small local ones: /models and /data under `root`, hf:// -> the bundled sample."""
    if isinstance(value, dict):
        return {k: _localize(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_localize(v, root) for v in value]
    if isinstance(value, str) and value.startswith(("/models/", "/data/")):
        p = root / value.lstrip("/")
        if p.suffix in (".csv", ".jsonl", ".txt", ".json"):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        else:
            p.mkdir(parents=True, exist_ok=True)
        return str(p)
    if isinstance(value, str) and value.startswith("hf://"):
        return str(REPO / "definemed" / "data" / "sample" / "fineweb2_de")
    return value


@pytest.fixture(scope="module")
def local_pipeline(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("clusterpaths")
    pipe = yaml.safe_load(PIPELINE.read_text())
    stages = {}
    for name, ref in pipe["stages"].items():
        sec = yaml.safe_load((REPO / ref).read_text())
        sec.pop("ray", None)
        sec = _localize(sec, root)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sec, sort_keys=False))
        stages[name] = sec
    out = root / "pipeline.yaml"
    out.write_text(yaml.safe_dump({"ray": pipe["ray"], "stages": {n: str(root / f"{n}.yaml") for n in stages}}))
    return out, stages


def expected_gpus(name: str, cfg: dict) -> dict[str, float]:
    """GPUs per unit the config puts on GPU, per request kind, read from the YAML (the cluster has GPUs)."""
    if name == "annotate":
        return {"engine": cfg["engine"]["tensor_parallel_size"]}
    if name == "classify-train":
        return {"worker": 1.0 if cfg["use_gpu"] else 0.0}
    if name == "filter":
        return {"scorer": cfg["num_gpus_per_actor"]}
    if name == "pack":
        return {"tasks": 0.0}
    if name == "cpt":
        return {"worker": 1.0 if cfg["parallel"]["use_gpu"] in (True, "auto") else 0.0}
    if name == "merge":
        return {"merge": cfg["resources"]["num_gpus"]}
    if name == "eval":
        tp = {m: r["engine"]["tensor_parallel_size"] for m, r in cfg["models"].items() if "path" in r}
        out = {f"mc {m}": t for m, t in tp.items()}
        out.update({f"serve {m}": t for m, t in tp.items()})
        out["serve judge"] = cfg["judge"]["engine"]["tensor_parallel_size"]
        return out
    raise AssertionError(name)


def _plan(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "definemed.cli", "plan", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def reserved(sim_cluster, local_pipeline, tmp_path_factory):
    pipeline, stages = local_pipeline
    report = tmp_path_factory.mktemp("plan") / "plan.json"
    r = _plan(["--config", str(pipeline), "--ray-address", sim_cluster.gcs_address, "--reserve",
               "--json", str(report)], sim_cluster.env)
    return r, (json.loads(report.read_text()) if report.exists() else None), stages


def test_every_stage_fits_and_its_placement_groups_become_ready(reserved):
    r, rep, stages = reserved
    assert rep is not None, r.stdout[-3000:] + r.stderr[-3000:]
    assert [s["stage"] for s in rep["stages"]] == list(stages)
    for s in rep["stages"]:
        assert s["fits"], (s["stage"], s.get("reason"))
        assert s["reservation"]["ok"], (s["stage"], s["reservation"])
    assert r.returncode == 0, r.stderr[-3000:]
    for name in stages:  # the table names every stage
        assert name in r.stdout


def test_gpu_work_is_asked_as_gpu_and_lands_on_workers(reserved):
    _, rep, stages = reserved
    assert rep is not None
    head = {n["node_id"] for n in rep["cluster"]["nodes"] if n["head"]}
    assert len(head) == 1
    wrong = []  # every defect at once, not only the first
    for s in rep["stages"]:
        want = expected_gpus(s["stage"], stages[s["stage"]])
        got = {q["key"]: q["gpus_per_unit"] for q in s["requests"]}
        wrong += [f"{s['stage']} {key}: asks {got.get(key)} GPUs per unit, config says {gpus}"
                  for key, gpus in want.items() if got.get(key) != pytest.approx(gpus)]
        for unit in (u for ph in s["reservation"]["phases"] for u in ph["units"]):
            if want.get(unit["key"], 0) > 0 and set(unit["bundle_nodes"]) & head:
                wrong.append(f"{s['stage']} {unit['key']}: GPU work placed on the head")
            probe = unit.get("probe")
            if unit["gpus_per_unit"] > 0 and probe is not None:
                assert probe["node_id"] not in head and probe["gpu_ids"], (s["stage"], unit)
                assert probe["cuda_visible_devices"]  # Ray gave the actor its logical GPUs
    assert not wrong, "\n".join(wrong)


def test_accelerator_and_node_type_resources_reach_the_requests(reserved):
    _, rep, stages = reserved
    assert rep is not None
    by = {s["stage"]: {q["key"]: q for q in s["requests"]} for s in rep["stages"]}
    worker = by["cpt"]["worker"]
    acc = stages["cpt"]["parallel"]["accelerator_type"]
    assert worker["min_units"] == stages["cpt"]["parallel"]["num_workers"]
    assert all(b.get(f"accelerator_type:{acc}", 0) > 0 for b in worker["bundles"])
    merge = by["merge"]["merge"]
    assert all(merge["bundles"][0].get(k) == v for k, v in stages["merge"]["resources"]["custom"].items())
    assert merge["bundles"][0]["memory"] == 64 * 2**30


def test_annotation_grows_into_free_gpus_and_releases_them_when_done(sim_cluster, local_pipeline, tmp_path):
    """The annotate stage's own ray.data.llm processor (min_replicas..max_replicas engines of TP4 from the cluster
    config) on the simulated cluster, with a sleeping stand-in for vLLM (no CUDA here): GPUs in use grow past one
    replica, never past max_replicas, and drop to zero once the documents are done. With ray.data.llm's default
    executor for TP > 1, each engine start left a placement group behind: 32 GPUs stayed held after the run."""
    import os

    _, stages = local_pipeline
    cfg = stages["annotate"]
    out = tmp_path / "autoscale.json"
    r = subprocess.run([sys.executable, str(REPO / "tests" / "autoscale_probe.py"), sim_cluster.gcs_address,
                        str(local_pipeline[0].parent / "annotate.yaml"), str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**sim_cluster.env, "PROBE_BATCHES": "24", "PROBE_BATCH_S": "2",
                            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    per = cfg["engine"]["tensor_parallel_size"]
    assert (rep["min_size"], rep["max_size"], rep["gpus_per_replica"]) == (cfg["min_replicas"], cfg["max_replicas"], per)
    used = [g for _, g in rep["samples"]]
    assert max(used) > cfg["min_replicas"] * per, used  # grew into free GPUs
    assert max(used) <= cfg["max_replicas"] * per, used  # within its bound
    assert used[-1] == 0, used  # and gave them back when done
    assert rep["rows"] == 24 * cfg["batch_size"]
