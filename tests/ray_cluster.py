"""Real `ray start` nodes on loopback for tests: a head, optional worker nodes with logical GPUs, token auth.

Every node runs in its own process group with every port chosen explicitly, so stopping them never touches
another Ray on the host (no global `ray stop`), and this test session's own local Ray is not disturbed.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
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


class RayNodes:
    """Start a head (and worker nodes) with `ray start --block`; `stop()` ends exactly those processes."""

    def __init__(self, log_dir: Path, name: str):
        self.log_dir = Path(log_dir)
        # Ray's temp dir path must stay short (unix socket paths are limited to ~107 bytes).
        self.temp_dir = Path("/tmp") / f"{name}-{os.getpid()}"
        self.procs: list[subprocess.Popen] = []
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
        # Token auth as on a real cluster, with a token of our own so ~/.ray/auth_token is neither needed nor touched.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.env = env
        self.gcs_address: str | None = None
        self.dashboard: str | None = None

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.log_dir / log_name, "w")
        proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                                 "--disable-usage-stats", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _node_ports(self) -> list[str]:
        # The defaults (e.g. the dashboard agent's 52365) collide with any other Ray on the host.
        agent_http, agent_grpc, env_agent, metrics, om, nm = free_ports(6)
        return [f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
                f"--object-manager-port={om}", f"--node-manager-port={nm}"]

    def start_head(self, *, num_cpus: int, num_gpus: int = 0, dashboard: bool = False,
                   object_store_bytes: int | None = None, resources: dict | None = None) -> None:
        gcs, dash, client = free_ports(3)
        args = ["--head", f"--port={gcs}", f"--ray-client-server-port={client}", f"--num-cpus={num_cpus}",
                f"--num-gpus={num_gpus}", f"--temp-dir={self.temp_dir}", *self._node_ports()]
        if dashboard:
            args += [f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
            self.dashboard = f"http://127.0.0.1:{dash}"
        else:
            args += ["--include-dashboard=false"]
        if object_store_bytes:
            args.append(f"--object-store-memory={object_store_bytes}")
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        proc = self._start(args, "head.log")
        self.gcs_address = f"127.0.0.1:{gcs}"
        self._wait_up(proc, "head.log")

    def add_worker(self, *, num_cpus: int, num_gpus: int = 0, memory_bytes: int | None = None,
                   resources: dict | None = None, object_store_bytes: int | None = None, attempts: int = 3) -> None:
        """Start a worker node and wait until it runs. `ray start` gives a raylet a fixed 30 s to register, which a
        loaded machine can miss; such a start is retried."""
        assert self.gcs_address, "start the head first"
        i = len(self.procs)
        args = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
        if memory_bytes:
            args.append(f"--memory={memory_bytes}")
        if object_store_bytes:
            args.append(f"--object-store-memory={object_store_bytes}")
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        for attempt in range(attempts):
            log = f"worker{i}-{attempt}.log"
            proc = self._start([*args, *self._node_ports()], log)
            try:
                self._wait_up(proc, log, dashboard=False)
                return
            except RuntimeError:
                self.procs.remove(proc)
                if attempt == attempts - 1 or "timed out during startup" not in (self.log_dir / log).read_text():
                    raise

    def _wait_up(self, proc: subprocess.Popen, log_name: str, timeout: float = 300, dashboard: bool = True) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ray exited: {(self.log_dir / log_name).read_text()[-2000:]}")
            if self.dashboard and dashboard:
                try:
                    urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                    return
                except urllib.error.HTTPError:
                    return  # any HTTP answer means it is up (Ray 2.60 answers 401 without its auth token)
                except OSError:
                    pass
            elif "Ray runtime started" in (self.log_dir / log_name).read_text():
                return
            time.sleep(1)
        raise RuntimeError(f"ray did not come up in {timeout:.0f} s: {(self.log_dir / log_name).read_text()[-2000:]}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5  # one grace period for all nodes, not one each (they stop in parallel)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
