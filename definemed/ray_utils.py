"""Start or join Ray the same way for every stage.

No address: a local Ray in this process with explicit logical resources (the physical cores are oversubscribed
so Serve's ingress replica and vLLM placement groups can schedule on a 2-core laptop). An address (or "auto"):
join that cluster; its resources are the cluster's own.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

from definemed.config import RayConfig

log = logging.getLogger(__name__)

PARQUET_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"

# Variables workers need to see the same way as the driver (vLLM CPU KV cache, offline hub).
_FORWARD_ENV = ("VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DEFINEMED_CACHE",
                "VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")


def default_env() -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for k in _FORWARD_ENV:
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def init_ray(cfg: RayConfig | None = None, address: str | None = None, **overrides: Any):
    """Idempotent ray.init. `address` (e.g. from --ray-address) wins over cfg.address."""
    import ray

    cfg = cfg or RayConfig()
    addr = address if address is not None else cfg.address
    if addr in (None, "") and os.environ.get("RAY_ADDRESS"):
        addr = os.environ["RAY_ADDRESS"]  # inside `ray job submit`: join the job's cluster, never start a new one
    if ray.is_initialized():
        return ray.get_runtime_context()
    for k, v in default_env().items():
        os.environ.setdefault(k, v)
    local = addr in (None, "", "local")
    footer_actors = cfg.parquet_footer_actors or (1 if local else None)
    if footer_actors is not None:  # read where a dataset is built (the driver), so the driver's env is the one
        os.environ.setdefault(PARQUET_FOOTER_ACTORS_ENV, str(footer_actors))
    kwargs: dict[str, Any] = dict(namespace=cfg.namespace, log_to_driver=True, logging_level=logging.WARNING)
    if local:
        runtime_env = dict(cfg.runtime_env or {})
        runtime_env["env_vars"] = {**default_env(), **(runtime_env.get("env_vars") or {})}
        kwargs.update(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                      dashboard_host=cfg.dashboard_host, runtime_env=runtime_env)
        if cfg.num_gpus is not None:
            kwargs["num_gpus"] = cfg.num_gpus
    else:
        # On a cluster the job's runtime_env (infra/runtime_env.yaml) and the image set the environment; adding
        # our own env_vars here would make Ray refuse to merge it with the job's ("Failed to merge ...").
        kwargs["address"] = addr
        if cfg.runtime_env:
            kwargs["runtime_env"] = cfg.runtime_env
    kwargs.update(overrides)
    log.info("ray.init(%s)", {k: v for k, v in kwargs.items() if k != "runtime_env"})
    return ray.init(**kwargs)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def as_completed(jobs: list[tuple[Any, Callable[[], Any]]], limit: int, desc: str,
                 unit: str = "task") -> Iterator[tuple[Any, Any]]:
    """(key, result) for each (key, submit) job as its Ray task finishes, with a progress bar. `submit()` starts
    the task and returns its ObjectRef; at most `limit` run at once, and Ray places them as resources allow."""
    import ray
    from tqdm import tqdm

    queue, running = list(jobs), {}
    with tqdm(total=len(queue), desc=desc, unit=unit) as bar:
        while queue or running:
            while queue and len(running) < limit:
                key, submit = queue.pop(0)
                running[submit()] = key
            (done,), _ = ray.wait(list(running), num_returns=1)
            yield running.pop(done), ray.get(done)
            bar.update(1)
