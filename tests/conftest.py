"""Shared fixtures. Integration tests share ONE local Ray for the whole session (starting Ray is slow)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DEFINEMED_CACHE", str(REPO / ".cache" / "definemed"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray per test session, with the demo's logical resources."""
    from definemed.config import RayConfig
    from definemed.ray_utils import init_ray, shutdown_ray

    init_ray(RayConfig(num_cpus=8))
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def tiny_qwen2() -> str:
    from definemed.models import resolve_model

    return resolve_model("tiny://qwen2")


@pytest.fixture(scope="session")
def tiny_mistral() -> str:
    from definemed.models import resolve_model

    return resolve_model("tiny://mistral")


@pytest.fixture(scope="session")
def tiny_xlmr() -> str:
    from definemed.models import resolve_model

    return resolve_model("tiny://xlm-roberta")


@pytest.fixture()
def in_own_process(ray_local):
    """`run(fn, *args)`: fn(*args) in a Ray task whose process holds nothing else and ends with it (max_calls=1),
    for tests that build one vLLM engine with the in-process core (make_llm sole_engine), as eval's tasks do."""
    import ray

    return lambda fn, *args: ray.get(ray.remote(max_retries=0, max_calls=1, num_cpus=2)(fn).remote(*args))


@pytest.fixture(scope="session")
def vllm_qwen2(ray_local, tiny_qwen2):
    """One vLLM CPU engine on the tiny Qwen2 for all tests that only need *an* engine, as `run(fn, *args)`, which
    calls fn(llm, *args) where the engine lives: a Ray actor that holds nothing else, so the engine core runs in
    its process (make_llm sole_engine), about half the start of an engine in this one (34 -> 15 s)."""
    import ray

    # num_cpus=0: it lives for the whole session and must not hold a logical CPU that later tests count on (a
    # Serve swap needs room for one more replica next to the served ones)
    @ray.remote(num_cpus=0, max_restarts=0)
    class Engine:
        def __init__(self, path: str):
            from definemed.engine import make_llm

            self.llm = make_llm(path, sole_engine=True)

        def run(self, fn, *args):
            return fn(self.llm, *args)

    engine = Engine.remote(tiny_qwen2)
    yield lambda fn, *args: ray.get(engine.run.remote(fn, *args))
    ray.kill(engine)


@pytest.fixture(scope="session")
def real_gemma() -> str:
    """google/gemma-3-270m from the registry package (the `real` extra), converted once into DEFINEMED_CACHE."""
    from definemed.models import resolve_model

    return resolve_model("real://gemma-3-270m")


@pytest.fixture(scope="session")
def real_smollm2() -> str:
    """HuggingFaceTB/SmolLM2-135M-Instruct from the registry package (installed --no-deps by the bootstrap),
    converted once into DEFINEMED_CACHE."""
    from definemed.models import resolve_model

    return resolve_model("real://smollm2-135m-instruct")
