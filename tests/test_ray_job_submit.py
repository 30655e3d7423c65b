"""A real `ray start --head` on loopback ports, a real `ray job submit` of the demo corpus stage.

The head runs in its own temp dir and process group, so stopping it never touches other Ray instances
(no global `ray stop`).
"""
import json
import os
import shutil
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: all sockets stay open until every port is chosen, or the OS may repeat one."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rayhead")
    # Ray's temp dir path must stay short (unix socket paths are limited to ~107 bytes).
    temp_dir = Path("/tmp") / f"dmrj-{os.getpid()}"
    # Every port explicit: the defaults (e.g. the dashboard agent's 52365) collide with any other Ray on the host,
    # including this test session's own local Ray.
    gcs, dash, client, agent_http, agent_grpc, env_agent, metrics = _free_ports(7)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    # Token auth as on a real cluster, with a token of our own so ~/.ray/auth_token is neither needed nor touched.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
         "--num-cpus=8", f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # any HTTP answer means it is up (Ray 2.60 answers 401 without its auth token)
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"ray head exited: {(tmp / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
    else:
        pytest.fail(f"ray head did not come up in 300 s: {(tmp / 'head.log').read_text()[-2000:]}")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


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
