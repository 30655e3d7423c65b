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


# --- words -> tokens per model family with measured fertility (definemed/plan/tokens.py) ---------------------------

def _table(tmp_path: Path) -> Path:
    import json

    d = tmp_path / "tok"
    d.mkdir()
    rows = [{"tokenizer": "v3", "family": "mistral-7b-v0.3", "tiny": False, "set": "finemed_de", "fertility": 2.0,
             "fertility_lo": 1.9, "fertility_hi": 2.1},
            {"tokenizer": "v3", "family": "mistral-7b-v0.3", "tiny": False, "set": "general_de", "fertility": 9.0,
             "fertility_lo": 9.0, "fertility_hi": 9.0},
            # a tiny tokenizer must never stand for a real family, whatever it is labelled
            {"tokenizer": "q", "family": "qwen2.5", "tiny": True, "set": "finemed_de", "fertility": 1.1,
             "fertility_lo": 1.0, "fertility_hi": 1.2}]
    doc = {"tokenizers": [{"name": "v3", "source": "mistral_common:x"}, {"name": "q", "source": "tiny://qwen2"}],
           "sets": [{"name": "finemed_de", "description": "test set", "texts": 10, "words": 1000, "limit": None},
                    {"name": "general_de", "description": "other", "texts": 10, "words": 1000, "limit": None}],
           "rows": rows}
    (d / "fertility.json").write_text(json.dumps(doc))
    return d


def _spec(tmp_path: Path, tokens: dict) -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    spec["tokens"] = tokens
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_plan_turns_words_into_tokens_steps_and_gpu_hours_per_family(tmp_path, capsys):
    import json
    import math

    from definemed.plan.cli import main

    table = _table(tmp_path)
    cpt = yaml.safe_load((REPO / "configs" / "cluster" / "cpt.yaml").read_text())
    cpt["model"] = "/models/Mistral-7B-Instruct-v0.3"
    cfg = tmp_path / "cpt.yaml"
    cfg.write_text(yaml.safe_dump(cpt))
    spec = _spec(tmp_path, {"words": 1e9, "words_source": "a stated count", "fertility": str(table)})
    out = tmp_path / "plan.json"
    assert main(str(cfg), stage="cpt", cluster_spec=str(spec), json_out=str(out)) == 0
    text = capsys.readouterr().out
    assert "tokens per model family" in text and str(table / "fertility.json") in text and "a stated count" in text
    tok = json.loads(out.read_text())["stages"][0]["tokens"]
    fam = {f["key"]: f for f in tok["families"]}
    m = fam["mistral-7b-v0.3"]
    assert m["configured"] and m["fertility"] == 2.0 and m["tokens"] == pytest.approx(2e9)
    assert (m["tokens_lo"], m["tokens_hi"]) == (pytest.approx(1.9e9), pytest.approx(2.1e9))
    assert m["steps"] == math.ceil(2e9 / cpt["train"]["global_batch_tokens"])
    thr = yaml.safe_load(SPEC.read_text())["throughput"]["cpt"]  # 32 workers x 1 GPU at the spec's rate
    wall = 2e9 / (thr["rate"] * 32) / 3600 + thr["startup_h"]
    assert m["wall_h"] == pytest.approx(wall) and m["gpu_h"] == pytest.approx(wall * 32)
    # Qwen2.5 has no measured tokenizer (the tiny one does not count): no number, and the plan says so
    q = fam["qwen2.5"]
    assert q["fertility"] is None and q["tokens"] is None and "not measured" in text and "offline" in q["why"]
    assert {"gemma-3", "smollm2", "mistral-small"} <= {k for k, f in fam.items() if f["tokens"] is None}
    assert f"{cpt['train']['max_steps']:,} steps" in text  # the config's own steps against one pass of the words


def test_plan_of_the_study_prints_tokens_per_family_from_the_committed_table(capsys):
    from definemed.plan.cli import main

    assert main(str(PIPELINE), cluster_spec=str(SPEC)) == 0
    text = capsys.readouterr().out
    block = text[text.index("tokens per model family"):]
    assert "docs/tokenizers/fertility.json" in block and "lineage" in block and "5.1B" in block
    for label in ("Mistral-7B-Instruct-v0.3", "Mistral-Small-24B", "Gemma 3", "SmolLM2"):
        line = next(ln for ln in block.splitlines() if ln.strip().startswith(label))
        assert "B [" in line and "GPU-h" not in line, line  # tokens with their CI
    assert "Qwen2.5 (cpt model)" in block and "Qwen2.5: not measured" in block


def test_plan_reads_a_measured_word_count_from_the_filter_stage(tmp_path, capsys):
    import json

    from definemed.plan.cli import main

    stats = tmp_path / "filter"
    stats.mkdir()
    (stats / "stats.json").write_text(json.dumps({"filtered": {"docs": 3, "words": 4_000_000}}))
    spec = _spec(tmp_path, {"words_from": str(stats), "fertility": str(_table(tmp_path))})
    out = tmp_path / "plan.json"
    assert main(str(REPO / "configs" / "cluster" / "cpt.yaml"), stage="cpt", cluster_spec=str(spec),
                json_out=str(out)) == 0
    tok = json.loads(out.read_text())["stages"][0]["tokens"]
    assert tok["words"] == 4e6 and "filter stage" in tok["words_source"]
    assert {f["key"]: f for f in tok["families"]}["mistral-7b-v0.3"]["tokens"] == pytest.approx(8e6)
    bad = _spec(tmp_path, {"words": 5.0})  # a count without its source
    r = _plan("--config", str(REPO / "configs" / "cluster" / "cpt.yaml"), "--stage", "cpt", "--cluster-spec", str(bad))
    assert r.returncode == 2 and "tokens" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
