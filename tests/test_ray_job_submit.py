"""A real `ray start --head` on loopback ports, real `ray job submit`s: the demo corpus stage, CPT with Ray Train
inside the job, and the merge task on its export.

The head runs in its own temp dir and process group, so stopping it never touches other Ray instances
(no global `ray stop`).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.ray_cluster import RayNodes

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    nodes = RayNodes(tmp_path_factory.mktemp("rayhead"), "dmrj")
    try:
        nodes.start_head(num_cpus=8, dashboard=True)
        yield nodes.dashboard, nodes.env
    finally:
        nodes.stop()


def _submit(address, env, entrypoint, timeout=600):
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".cache", ".git", "outputs", "**/__pycache__"],
                                             "env_vars": {"DEFINEMED_CACHE": os.environ["DEFINEMED_CACHE"]}}),
           "--", *entrypoint]
    deadline = time.time() + 240
    while True:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
        # Right after start the dashboard can answer before the job agent registers, and a loaded head can miss
        # the client's connect timeout; only those start-up answers are retried.
        out = r.stderr + r.stdout
        starting = "No available agent to submit job" in out or "Failed to connect to Ray at address" in out
        if r.returncode == 0 or not starting or time.time() > deadline:
            return r
        time.sleep(5)


@pytest.mark.integration
def test_submit_demo_corpus_stage(ray_head, tmp_path):
    address, env = ray_head
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["stages"]
    cfg = dict(demo["annotate"])
    # The demo's own annotate section, made smaller: 32 sampled docs in 2 resumable shards.
    cfg.update(output_dir=str(tmp_path / "annotate"), sample_size=32, shard_size=16, bootstrap=100)
    cfg_path = tmp_path / "annotate.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = _submit(address, env, ["python", "-m", "jobs.annotate", "--config", str(cfg_path)])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    done = json.loads((tmp_path / "annotate" / "_DONE.json").read_text())
    import pandas as pd

    labels = pd.read_parquet(done["outputs"]["labels"])
    assert len(labels) == 32 and labels["id"].is_unique
    assert set(labels["label"]) <= {"medical", "non_medical", "unparsed"}
    assert (tmp_path / "annotate" / "lineage.json").exists()
    # Submitting the same stage again resumes/skips: it must not clobber the finished output.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "annotate").rglob("*.parquet")}
    r2 = _submit(address, env, ["python", "-m", "jobs.annotate", "--config", str(cfg_path)])
    assert r2.returncode == 0 and "already complete" in (r2.stdout + r2.stderr)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "annotate").rglob("*.parquet")} == before


@pytest.mark.integration
def test_submit_invalid_config_fails_with_exit_2(ray_head, tmp_path):
    address, env = ray_head
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"output_dir: {tmp_path}/x\nbogus_field: 1\n")
    r = _submit(address, env, ["python", "-m", "jobs.tiny_models", "--config", str(bad)])
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "invalid config field 'bogus_field': unknown key" in out and "failed" in out.lower()


@pytest.mark.integration
def test_submit_cpt_with_ray_train_then_merge(ray_head, tmp_path):
    """Ray Train inside a job (the cpt stage on 2 CPU workers), then the merge stage's Ray task on its export."""
    import pyarrow.parquet as pq

    from definemed.data.sample import SAMPLE_WEB_DIR
    from definemed.train.pack import pack_local

    address, env = ray_head
    packed = pack_local(pq.read_table(SAMPLE_WEB_DIR, columns=["text"]), "tiny://qwen2", tmp_path / "pack", 256)
    cpt = {"output_dir": str(tmp_path / "cpt"), "model": "tiny://qwen2", "packed": str(packed),
           "parallel": {"num_workers": 2, "cpus_per_worker": 1, "shard_group_size": 2},
           "optim": {"lr": 1e-3}, "train": {"seq_len": 256, "global_batch_tokens": 1024, "max_steps": 2},
           "checkpoint": {"every_steps": 2, "keep": 1, "max_failures": 0}}
    (tmp_path / "cpt.yaml").write_text(yaml.safe_dump(cpt))
    r = _submit(address, env, ["python", "-m", "jobs.cpt", "--config", str(tmp_path / "cpt.yaml")])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    done = json.loads((tmp_path / "cpt" / "_DONE.json").read_text())
    hf = Path(done["outputs"]["hf_model"])
    assert (hf / "model.safetensors").exists()
    assert json.loads(Path(done["outputs"]["summary"]).read_text())["steps"] == 2

    merge = {"output_dir": str(tmp_path / "merge"), "model_a": "tiny://qwen2", "model_b": str(hf),
             "method": "slerp", "t": {"self_attn": [0, 0.5, 1], "mlp": [1, 0.5, 0], "default": 0.5},
             "resources": {"num_cpus": 1, "num_gpus": 0, "memory": "1GiB"}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(merge))
    r = _submit(address, env, ["python", "-m", "jobs.merge", "--config", str(tmp_path / "merge.yaml")])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    done = json.loads((tmp_path / "merge" / "_DONE.json").read_text())
    merged = Path(done["outputs"]["model"])
    assert (merged / "mergekit_config.yml").exists() and list(merged.glob("*.safetensors"))
