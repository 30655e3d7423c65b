"""Kill a stage's driver for real: run it in a child process joined to the tests' Ray, watch its outputs, and
send SIGKILL once a condition holds. No clean return, no `finally`, no atexit: what a crash leaves behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def kill_when(code: str, when: Callable[[], bool], timeout: float = 240.0) -> None:
    """Run `code` (Python) in a child whose Ray is the tests' cluster, SIGKILL it as soon as `when()` is true.
    Fails if the child ends by itself first (then nothing was killed) or `when` never holds."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    deadline = time.monotonic() + timeout
    try:
        while not when():
            if child.poll() is not None:
                raise AssertionError(f"the child ended by itself (exit {child.returncode}) before it was killed")
            if time.monotonic() > deadline:
                raise AssertionError("the kill condition never held")
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    time.sleep(2)  # Ray reaps the dead driver's workers; a part in flight may still land meanwhile
