"""The Ray resources each stage requests, computed by the same functions the stages themselves call.

A stage makes one or more `Request`s: `min_units`..`max_units` copies of one placement group (a list of bundles;
a plain actor or task is a group of one bundle). Requests of the same `phase` hold their resources at the same
time; phases run one after another (e.g. eval needs one scoring engine at a time, then hosts every model at once).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

Bundle = dict[str, float]
CORE = ("CPU", "GPU", "memory")


def clean(bundle: Mapping[str, float | None]) -> Bundle:
    """Drop zero and unset entries (Ray rejects zero-sized bundle resources)."""
    return {k: float(v) for k, v in bundle.items() if v}


@dataclass
class Request:
    stage: str
    key: str  # stable name within the stage: "engine", "worker", "mc base", "serve judge", ...
    what: str  # what one unit is, in words
    bundles: list[Bundle]
    strategy: str = "PACK"
    min_units: int = 1
    max_units: int = 1
    phase: str = "run"
    note: str = ""

    def __post_init__(self):
        self.bundles = [clean(b) for b in self.bundles]
        self.max_units = max(self.max_units, self.min_units)

    def per_unit(self, resource: str) -> float:
        return sum(b.get(resource, 0.0) for b in self.bundles)

    @property
    def gpus_per_unit(self) -> float:
        return self.per_unit("GPU")

    @property
    def device(self) -> str:
        return "gpu" if self.gpus_per_unit > 0 else "cpu"

    @property
    def node_types(self) -> list[str]:
        """Resources that pin a node class (accelerator type, a node type from cluster.yaml)."""
        return sorted({k for b in self.bundles for k in b if k not in CORE})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(gpus_per_unit=self.gpus_per_unit, cpus_per_unit=self.per_unit("CPU"),
                 memory_per_unit=self.per_unit("memory"), device=self.device, node_types=self.node_types)
        return d


@dataclass
class StageRequests:
    stage: str
    requests: list[Request] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. how `auto` was resolved

    def phases(self) -> list[str]:
        return list(dict.fromkeys(r.phase for r in self.requests))

    def in_phase(self, phase: str) -> list[Request]:
        return [r for r in self.requests if r.phase == phase]


# ---------------------------------------------------------------------------------------------------- stages


def _auto_note(out: "StageRequests", what: str, choice, device: str, resources: Mapping[str, float]) -> None:
    if choice == "auto":
        out.notes.append(f"{what}: accelerator auto -> {device} (the cluster has {resources.get('GPU', 0):g} GPUs)")


def _engine_request(stage: str, key: str, what: str, engine, resources: Mapping[str, float], **kw) -> Request:
    from definemed.engine import engine_device, placement_group_config

    pg = placement_group_config(engine, engine_device(engine, dict(resources)))
    return Request(stage, key, what, pg["bundles"], strategy=pg["strategy"], **kw)


def annotate(cfg, resources: Mapping[str, float]) -> StageRequests:
    from definemed.engine import engine_device

    out = StageRequests("annotate")
    if cfg.backend == "http":
        h = cfg.http
        out.requests.append(Request("annotate", "http", "HTTP client actor", [{"CPU": 1}],
                                    min_units=1, max_units=h.concurrency, strategy="SPREAD"))
        return out
    _auto_note(out, "engine", cfg.engine.accelerator, engine_device(cfg.engine, dict(resources)), resources)
    lo, hi = cfg.replica_bounds()  # the (min, max) concurrency corpus/annotate.py gives ray.data.llm
    out.requests.append(_engine_request("annotate", "engine",
                                        f"vLLM engine replica (TP{cfg.engine.tensor_parallel_size})", cfg.engine,
                                        resources, min_units=lo, max_units=hi))
    return out


def _scaling_bundle(scaling) -> Bundle:
    """One Ray Train worker's resources, from the ScalingConfig the trainer is given (public total / workers)."""
    return {k: v / scaling.max_workers for k, v in scaling.total_resources.items()}


def classify_train(cfg, resources: Mapping[str, float]) -> StageRequests:
    from ray.train import ScalingConfig

    scaling = ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu)  # as corpus/classify.py builds it
    return StageRequests("classify-train", [Request(
        "classify-train", "worker", "Ray Train worker (XLM-R fine-tuning)", [_scaling_bundle(scaling)],
        strategy=scaling.placement_strategy, min_units=cfg.num_workers, max_units=cfg.num_workers)])


def filter_(cfg, resources: Mapping[str, float]) -> StageRequests:
    # corpus/filter.py: map_batches(ActorPoolStrategy(min_actors, max_actors), num_cpus=..., num_gpus=...)
    return StageRequests("filter", [Request(
        "filter", "scorer", "classifier scorer actor (autoscaling pool)",
        [{"CPU": cfg.num_cpus_per_actor, "GPU": cfg.num_gpus_per_actor}], strategy="SPREAD",
        min_units=cfg.min_actors, max_units=cfg.max_actors)])


def pack(cfg, resources: Mapping[str, float]) -> StageRequests:
    return StageRequests("pack", [Request(
        "pack", "tasks", "Ray Data tokenize/pack task", [{"CPU": 1}], strategy="SPREAD",
        max_units=max(1, int(resources.get("CPU", 1))),
        note="Ray Data runs as many 1-CPU tasks as there are free CPUs")])


def cpt(cfg, resources: Mapping[str, float]) -> StageRequests:
    from definemed.train.cpt import scaling_config

    p = cfg.parallel
    scaling = scaling_config(cfg, dict(resources))  # the ScalingConfig build_trainer gives TorchTrainer
    out = StageRequests("cpt", [Request(
        "cpt", "worker", "Ray Train worker (FSDP2 rank)", [_scaling_bundle(scaling)],
        strategy=scaling.placement_strategy, min_units=p.num_workers, max_units=p.num_workers)])
    _auto_note(out, "workers", p.use_gpu, "gpu" if scaling.use_gpu else "cpu", resources)
    return out


def merge(cfg, resources: Mapping[str, float]) -> StageRequests:
    o = cfg.resources.ray_options()
    bundle = {"CPU": o.get("num_cpus"), "GPU": o.get("num_gpus"), "memory": o.get("memory"),
              **o.get("resources", {})}
    return StageRequests("merge", [Request("merge", "merge", "mergekit merge task", [bundle])])


def merge_search(cfg, resources: Mapping[str, float]) -> StageRequests:
    from definemed.merge.search.run import trial_resources

    r = trial_resources(cfg, cfg.scoring.engine.resolve(dict(resources)))
    bundle = {"CPU": r.get("cpu"), "GPU": r.get("gpu"), "memory": r.get("memory"),
              **{k: v for k, v in r.items() if k not in ("cpu", "gpu", "memory")}}
    return StageRequests("merge-search", [Request(
        "merge-search", "trial", "Tune trial actor (one vLLM engine, in-memory merges)", [bundle],
        min_units=1, max_units=cfg.max_concurrent_trials,
        note=f"{cfg.trials} trials, up to {cfg.max_concurrent_trials} side by side")])


def prune(cfg, resources: Mapping[str, float]) -> StageRequests:
    o = cfg.resources.ray_options()  # distill/prune.py: one Ray task, like merge
    bundle = {"CPU": o.get("num_cpus"), "GPU": o.get("num_gpus"), "memory": o.get("memory"),
              **o.get("resources", {})}
    return StageRequests("prune", [Request("prune", "prune", "calibration + pruning task (loads the teacher)",
                                           [bundle])])


def distill(cfg, resources: Mapping[str, float]) -> StageRequests:
    from definemed.train.trainer import scaling_config

    p = cfg.parallel
    scaling = scaling_config(cfg, dict(resources))  # the ScalingConfig distill/stage.py gives TorchTrainer
    runs = ["student"] + (["control"] if cfg.control else [])
    what = {"student": "student + frozen teacher", "control": "CE-only control"}
    out = StageRequests("distill", [Request(
        "distill", f"worker {run}", f"Ray Train worker (FSDP2 rank; {what[run]})", [_scaling_bundle(scaling)],
        strategy=scaling.placement_strategy, min_units=p.num_workers, max_units=p.num_workers, phase=run)
        for run in runs],
        notes=[f"teacher placement: {cfg.teacher.placement} (auto: replicated while its weights take <= "
               f"{cfg.teacher.replicate_below:.0%} of a worker's device memory)"])
    _auto_note(out, "workers", p.use_gpu, "gpu" if scaling.use_gpu else "cpu", resources)
    return out


def _engine_task(engine, resources: Mapping[str, float]) -> Bundle:
    from definemed.engine import task_resources

    o = task_resources(engine.resolve(dict(resources)))  # as eval/stage.py run_mc starts the MC scoring task
    return {"CPU": o.get("num_cpus"), "GPU": o.get("num_gpus")}


def serve_models(stage: str, cfg, resources: Mapping[str, float], phase: str = "run") -> list[Request]:
    """A ServeConfig's deployments: one placement group per model replica (serve/app.py llm_config). The first
    model's replicas are also the HTTP ingress, so the endpoint adds no deployment of its own."""
    out = []
    for spec in cfg.models:
        a = spec.autoscaling
        out.append(_engine_request(stage, f"serve {spec.id}",
                                   f"Serve LLM '{spec.id}' (TP{spec.engine.tensor_parallel_size})",
                                   spec.engine, resources, min_units=a.min_replicas, max_units=a.max_replicas,
                                   phase=phase))
    return out


def hosting_config(cfg):
    """The ServeConfig the eval stage hosts its models with (eval/stage.py Hosting), validated plan-only."""
    from definemed.eval.stage import Hosting
    from serve.config import ServeConfig

    h = cfg.hosting
    data = {"app_name": "definemed-eval", "host": h.host, "port": h.port, "ready_timeout_s": h.ready_timeout_s,
            "models": Hosting(cfg).specs, **h.serve}
    return ServeConfig.model_validate(data, context={"plan_only": True})


def eval_(cfg, resources: Mapping[str, float]) -> StageRequests:
    out = StageRequests("eval")
    for name in cfg.mc_models():  # one Ray task per model; up to parallel_models run side by side where they fit
        ref = cfg.models[name]
        out.requests.append(Request("eval", f"mc {name}", "MC scoring task (one vLLM engine)",
                                    [_engine_task(ref.engine, resources)], phase=f"mc {name}"))
    if cfg.pairwise is not None:
        hcfg = hosting_config(cfg)
        for r in serve_models("eval", hcfg, resources, phase="pairwise"):
            out.requests.append(r)
    return out


def serve(cfg, resources: Mapping[str, float]) -> StageRequests:
    return StageRequests("serve", serve_models("serve", cfg, resources))


def tiny_models(cfg, resources: Mapping[str, float]) -> StageRequests:
    return StageRequests("tiny-models", [], notes=["runs in the driver, no Ray resources"])


def tokenizers(cfg, resources: Mapping[str, float]) -> StageRequests:
    return StageRequests("tokenizers", [], notes=["runs in the driver (tokenizers only, no model), no Ray resources"])


def serve_demo(cfg, resources: Mapping[str, float]) -> StageRequests:
    from serve.config import ServeConfig

    # serve/demo.py: one model, default autoscaling and ingress
    scfg = ServeConfig.model_validate({"models": [{"id": cfg.model_id, "model": cfg.model,
                                                   "engine": cfg.engine.model_dump()}]},
                                      context={"plan_only": True})
    return StageRequests("serve-demo", serve_models("serve-demo", scfg, resources))


BUILDERS: dict[str, Callable[[Any, Mapping[str, float]], StageRequests]] = {
    "tokenizers": tokenizers,
    "tiny-models": tiny_models, "annotate": annotate, "classify-train": classify_train, "filter": filter_,
    "pack": pack, "cpt": cpt, "merge": merge, "merge-search": merge_search,
    "prune": prune, "distill": distill, "serve-demo": serve_demo, "eval": eval_, "serve": serve,
}


def stage_requests(stage: str, cfg, resources: Mapping[str, float]) -> StageRequests:
    """What `stage` run with `cfg` asks a cluster with these total `resources` for."""
    return BUILDERS[stage](cfg, resources)
