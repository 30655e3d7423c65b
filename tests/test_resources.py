"""The CPU-vs-GPU decision comes from config and the cluster, never from the driver's hardware. The driver's GPU
count is set by the tests (monkeypatched), so every answer below holds on a CPU host and on a GPU host alike."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from definemed.config import ConfigError, parse_config
from definemed.engine import EngineConfig, engine_kwargs, placement_group_config, task_resources
from definemed.resources import resolve_device

REPO = Path(__file__).resolve().parents[1]
GPU_CLUSTER = {"CPU": 392.0, "GPU": 32.0, "accelerator_type:A100": 32.0}
CPU_CLUSTER = {"CPU": 8.0}


@pytest.mark.parametrize("driver_gpus", [0, 4])
def test_auto_follows_the_cluster_not_the_driver(monkeypatch, driver_gpus):
    import torch

    import definemed.resources as resources

    monkeypatch.setattr(torch.cuda, "device_count", lambda: driver_gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: driver_gpus > 0)
    assert resolve_device("auto", GPU_CLUSTER) == "gpu"
    assert resolve_device("auto", CPU_CLUSTER) == "cpu"  # a GPU driver (workstation) with a CPU cluster: cpu
    assert resolve_device("cpu", GPU_CLUSTER) == "cpu" and resolve_device("gpu", CPU_CLUSTER) == "gpu"
    assert resolve_device(True, CPU_CLUSTER) == "gpu" and resolve_device(False, GPU_CLUSTER) == "cpu"
    # no Ray connected: the work runs in this process, so this process's GPUs decide
    monkeypatch.setattr(resources, "cluster_resources", lambda: None)
    assert resolve_device("auto") == ("gpu" if driver_gpus else "cpu")


def test_one_engine_decision_drives_bundles_task_resources_and_vllm_kwargs():
    tp2 = EngineConfig(tensor_parallel_size=2)
    dev = tp2.resolve(GPU_CLUSTER)
    assert dev.accelerator == "gpu"
    pg = placement_group_config(dev)
    assert pg == {"bundles": [{"GPU": 1, "CPU": 1}] * 2, "strategy": "STRICT_PACK"}  # TP ranks share a node
    assert task_resources(dev) == {"num_cpus": 1, "num_gpus": 2}
    kw = engine_kwargs(dev)
    assert kw["gpu_memory_utilization"] == 0.9 and kw["enforce_eager"] is False  # CUDA graphs on GPU
    cpu = tp2.resolve(CPU_CLUSTER)
    assert placement_group_config(cpu) == {"bundles": [{"CPU": 1}], "strategy": "PACK"}
    assert task_resources(cpu) == {"num_cpus": 1}
    kw = engine_kwargs(cpu)
    assert kw["enforce_eager"] is True and "gpu_memory_utilization" not in kw  # eager only on CPU
    assert engine_kwargs(EngineConfig(accelerator="gpu", enforce_eager=True))["enforce_eager"] is True


def test_laptop_defaults_are_unchanged(monkeypatch):
    """No Ray, no GPU: the demo's engines get what they always got."""
    import definemed.resources as resources

    monkeypatch.setattr(resources, "cluster_resources", lambda: None)
    monkeypatch.setattr(resources, "local_resources", lambda: {"GPU": 0.0})
    kw = engine_kwargs(EngineConfig())
    assert kw == {"dtype": "bfloat16", "max_model_len": 256, "enforce_eager": True, "tensor_parallel_size": 1,
                  "seed": 0}
    assert placement_group_config(EngineConfig())["bundles"] == [{"CPU": 1}]


def _cluster_engines():
    c = REPO / "configs" / "cluster"
    ann = yaml.safe_load((c / "annotate.yaml").read_text())
    yield "annotate", ann["engine"]
    ev = yaml.safe_load((c / "eval.yaml").read_text())
    for name, ref in {**ev["models"], "judge": ev["judge"]}.items():
        yield f"eval.{name}", ref["engine"]
    for m in yaml.safe_load((c / "serve.yaml").read_text())["models"]:
        yield f"serve.{m['id']}", m["engine"]


@pytest.mark.parametrize("name,engine", list(_cluster_engines()), ids=lambda x: x if isinstance(x, str) else "")
def test_cluster_engine_configs_use_gpus_and_cuda_graphs(name, engine):
    cfg = EngineConfig.model_validate(engine)
    assert cfg.accelerator == "gpu", f"{name}: GPU groups autoscale from zero; say gpu, not auto"
    kw = engine_kwargs(cfg)  # on this CPU-only driver: the decision is the config's
    assert kw["enforce_eager"] is False and "gpu_memory_utilization" in kw, name


def test_cpt_scaling_config_follows_the_cluster():
    from definemed.train.cpt import ParallelConfig, scaling_config

    class Cfg:  # scaling_config reads only .parallel
        parallel = ParallelConfig(num_workers=4, cpus_per_worker=8, accelerator_type="A100")

    gpu = scaling_config(Cfg, GPU_CLUSTER)
    assert gpu.use_gpu and gpu.num_workers == 4
    assert gpu.total_resources == {"CPU": 32.0, "GPU": 4.0, "accelerator_type:A100": pytest.approx(0.004)}
    cpu = scaling_config(Cfg, CPU_CLUSTER)
    assert not cpu.use_gpu and cpu.total_resources == {"CPU": 32.0}  # no accelerator_type without GPUs


def test_hf_sources_are_refused_while_the_hub_is_off(monkeypatch, tmp_path):
    from definemed.corpus.config import FilterConfig

    (tmp_path / "clf").mkdir()
    data = {"output_dir": str(tmp_path / "o"), "classifier": str(tmp_path / "clf"),
            "source": {"path": "hf://datasets/HuggingFaceFW/fineweb-2/data/deu_Latn/train/*.parquet"}}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        parse_config(FilterConfig, data)
    msg = str(e.value)
    assert "\n" not in msg and "source.path" in msg and "HF_HUB_OFFLINE" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")  # unset: definemed runs offline by default, still refused
    with pytest.raises(ConfigError):
        parse_config(FilterConfig, data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # hub access explicitly on
    assert parse_config(FilterConfig, data).source.path.startswith("hf://")


def test_cluster_configs_pass_offline_validation(monkeypatch):
    """Validated as `definemed plan` does (paths need not exist yet), with the hub off as on the cluster."""
    from definemed.plan.load import load_stages

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stages, _ = load_stages(str(REPO / "configs" / "cluster" / "pipeline.yaml"))
    assert [n for n, _ in stages] == ["annotate", "classify-train", "filter", "pack", "cpt", "merge", "eval"]
    load_stages(str(REPO / "configs" / "cluster" / "serve.yaml"), stage="serve")


def test_batch_labelling_keeps_tensor_parallel_ranks_inside_the_engine_actor():
    from definemed.engine import batch_engine_kwargs

    tp4 = EngineConfig(accelerator="gpu", tensor_parallel_size=4)
    assert batch_engine_kwargs(tp4)["distributed_executor_backend"] == "mp"  # no placement group left behind
    assert "distributed_executor_backend" not in batch_engine_kwargs(EngineConfig(accelerator="gpu"))
    assert "distributed_executor_backend" not in batch_engine_kwargs(EngineConfig(tensor_parallel_size=2,
                                                                                  accelerator="cpu"))


@pytest.mark.parametrize("accelerator, sole, in_process", [("cpu", True, "0"), ("cpu", False, None),
                                                         ("gpu", True, None)])
def test_offline_engine_runs_its_core_in_process_only_as_a_sole_cpu_engine(monkeypatch, accelerator, sole,
                                                                          in_process):
    """On CPU the engine core and its worker in their own processes cost two torch+vLLM imports per engine; a
    one-engine process (the eval stage's max_calls=1 tasks) keeps the core in-process. Anywhere else a second
    engine in the same process would share vLLM's process-global state, and GPUs keep vLLM's default."""
    import vllm

    from definemed.engine import make_llm

    seen = {}

    class RecordingLLM:  # test double: records the environment vLLM would read, builds nothing
        def __init__(self, model, **kw):
            import os

            seen.update(env=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"), kw=kw)

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # recorded, so what make_llm sets is undone
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    make_llm("some/model", EngineConfig(accelerator=accelerator), sole_engine=sole)
    assert seen["env"] == in_process
    assert seen["kw"]["enforce_eager"] is (accelerator == "cpu")


@pytest.mark.parametrize("address, configured, expected", [
    (None, None, "1"),  # a local Ray: one footer-reading actor per read, not Ray's 32
    ("ray://head:10001", None, None),  # a cluster: Ray's own default
    ("ray://head:10001", 8, "8"),
    (None, 4, "4"),
])
def test_parquet_footer_actors_follow_config_and_local_or_cluster(monkeypatch, address, configured, expected):
    import ray

    from definemed.config import RayConfig
    from definemed.ray_utils import PARQUET_FOOTER_ACTORS_ENV, init_ray

    monkeypatch.delenv(PARQUET_FOOTER_ACTORS_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: kw)  # test double: only the environment is under test
    init_ray(RayConfig(address=address, parquet_footer_actors=configured))
    assert os.environ.get(PARQUET_FOOTER_ACTORS_ENV) == expected


@pytest.mark.integration
def test_as_completed_keeps_at_most_limit_tasks_running_and_returns_every_result(ray_local):
    """The eval stage's model tasks: submitted `limit` at a time, side by side, every result under its key."""
    import time

    import ray

    from definemed.ray_utils import as_completed

    @ray.remote(num_cpus=1)
    def span(i: int) -> tuple[int, float, float]:
        t0 = time.monotonic()  # one clock for every process on this host
        time.sleep(3)  # longer than a worker process takes to start, so the first two overlap
        return i, t0, time.monotonic()

    got = dict(as_completed([(f"m{i}", lambda i=i: span.remote(i)) for i in range(4)], limit=2, desc="test"))
    assert sorted(got) == [f"m{i}" for i in range(4)] and all(got[f"m{i}"][0] == i for i in range(4))
    spans = [v[1:] for v in got.values()]
    running = [sum(a <= t < b for a, b in spans) for t, _ in spans]  # tasks running as each one starts
    assert max(running) == 2, spans  # two side by side, never three
