"""A real `ray start --head` on loopback ports, real `ray job submit`s: pack on Ray Data, CPT with Ray Train
inside the job, the merge task on its export, and an invalid config.

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
                                             "env_vars": {"DEFINEMED_CACHE": os.environ["DEFINEMED_CACHE"],
                                                          # a 2-core head: 1 parquet footer actor, not Ray's 32
                                                          "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}}),
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
def test_submit_invalid_config_fails_with_exit_2(ray_head, tmp_path):
    address, env = ray_head
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"output_dir: {tmp_path}/x\nbogus_field: 1\n")
    r = _submit(address, env, ["python", "-m", "jobs.tiny_models", "--config", str(bad)])
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "invalid config field 'bogus_field': unknown key" in out and "failed" in out.lower()


@pytest.mark.integration
def test_submit_pack_then_cpt_with_ray_train_then_merge(ray_head, tmp_path):
    """The training half of the demo as one pipeline job: pack (Ray Data), cpt (Ray Train, 2 CPU workers), merge
    (a Ray task on cpt's export), all on the job's cluster. One job, not three: each job's driver start-up is CI
    time, and every per-stage entrypoint is the same three lines over `jobs._common.main` (the invalid-config
    test above submits one). Reuse of finished stages is tested in-process (tests/test_stale_outputs_stages.py),
    and the annotation stage's Ray Data + vLLM path in tests/test_corpus_pipeline.py."""
    from definemed.data.sample import SAMPLE_WEB_DIR

    address, env = ray_head
    o = tmp_path / "out"
    spec = {"stages": {
        "pack": {"output_dir": str(o / "pack"), "input": str(SAMPLE_WEB_DIR), "model": "tiny://qwen2",
                 "seq_len": 256, "sequences_per_shard": 64},
        "cpt": {"output_dir": str(o / "cpt"), "model": "tiny://qwen2", "packed": str(o / "pack"),
                "parallel": {"num_workers": 2, "cpus_per_worker": 1, "shard_group_size": 2},
                "optim": {"lr": 1e-3}, "train": {"seq_len": 256, "global_batch_tokens": 1024, "max_steps": 2},
                "checkpoint": {"every_steps": 2, "keep": 1, "max_failures": 0}},
        "merge": {"output_dir": str(o / "merge"), "model_a": "tiny://qwen2", "model_b": str(o / "cpt" / "hf_model"),
                  "method": "slerp", "t": {"self_attn": [0, 0.5, 1], "mlp": [1, 0.5, 0], "default": 0.5},
                  "resources": {"num_cpus": 1, "num_gpus": 0, "memory": "1GiB"}}}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    r = _submit(address, env, ["python", "-m", "jobs.pipeline", "--config", str(tmp_path / "pipeline.yaml")])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()

    done = json.loads((o / "pack" / "_DONE.json").read_text())
    assert list(Path(done["outputs"]["shards"]).glob("part-*.parquet")) and (o / "pack" / "lineage.json").exists()
    done = json.loads((o / "cpt" / "_DONE.json").read_text())
    assert (Path(done["outputs"]["hf_model"]) / "model.safetensors").exists()
    summary = json.loads(Path(done["outputs"]["summary"]).read_text())
    assert summary["steps"] == 2 and summary["mesh"] == [1, 2]  # Ray Train ran 2 workers inside the job
    done = json.loads((o / "merge" / "_DONE.json").read_text())
    merged = Path(done["outputs"]["model"])
    assert (merged / "mergekit_config.yml").exists() and list(merged.glob("*.safetensors"))
