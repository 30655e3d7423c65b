"""The stage registry and the one way every stage runs (CLI, jobs/, pipeline).

A stage is a config model plus a ``run(cfg) -> dict[str, str]`` returning named output paths. Both are given
as import strings so `definemed --help` stays fast and a stage's heavy imports load only when it runs.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from definemed.config import ConfigError, StageConfig
from definemed.io import atomic_write_json
from definemed.lineage import write_manifest

log = logging.getLogger(__name__)
DONE_MARKER = "_DONE.json"


@dataclass(frozen=True)
class Stage:
    name: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function"
    help: str
    uses_ray: bool = True

    def config_model(self) -> type[StageConfig]:
        return _load(self.config)

    def run_fn(self) -> Callable[[Any], dict[str, str]]:
        return _load(self.run)


def _load(target: str):
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


# Pipeline order. Each issue adds its stage here.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("tiny-models", "definemed.models.stage:TinyModelsConfig", "definemed.models.stage:run",
              "Build (or reuse) the cached tiny offline models and check they load.", uses_ray=False),
        # -- corpus (issue 4): annotate, classify-train, filter
        Stage("annotate", "definemed.corpus.config:AnnotateConfig", "definemed.corpus.stage:run_annotate",
              "Label a seeded sample medical/non-medical with an LLM (Ray Data + vLLM or an OpenAI endpoint); "
              "quality report vs human labels."),
        Stage("classify-train", "definemed.corpus.config:ClassifyConfig", "definemed.corpus.stage:run_classify",
              "Fine-tune the XLM-R medical classifier under Ray Train; threshold sweep, PR curve, HF model dir."),
        Stage("filter", "definemed.corpus.config:FilterConfig", "definemed.corpus.stage:run_filter",
              "Score the corpus with the classifier (autoscaling actor pool), keep >= threshold, dedup, "
              "decontaminate, redact PII: FineMed-de + stats."),
        # -- train (issue 5): pack, cpt
        Stage("pack", "definemed.train.pack:PackConfig", "definemed.train.pack:run",
              "Tokenize FineMed-de on Ray Data (EOS per document) and bin-pack it best-fit-decreasing into "
              "constant-length sequences; padding vs naive one-document-per-row."),
        Stage("cpt", "definemed.train.cpt:CptConfig", "definemed.train.cpt:run",
              "Continual pre-training on Ray Train: FSDP2/HSDP, micro batch 1, sharded checkpoints with "
              "automatic resume, MFU metrics, HF safetensors export."),
        # -- merge (issue 6): merge
        Stage("merge", "definemed.merge.config:MergeStageConfig", "definemed.merge.run:run",
              "SLERP-merge the CPT model back into its instruct model (mergekit, layer-wise schedule, Ray task)."),
        # -- serve (issue 7): serve-demo
        Stage("serve-demo", "serve.demo:ServeDemoConfig", "serve.demo:run",
              "Serve the merged model behind the secured OpenAI endpoint, ask one German clinical question, stop."),
        # -- eval (issue 8): eval
        Stage("eval", "definemed.eval.config:EvalConfig", "definemed.eval.stage:run",
              "MMLU-de/MedQA-de letter scoring, pairwise LLM-judge win-rate (both orders, LC), failure modes "
              "(language mixing, verbosity, typos, judge flags); one Markdown/HTML report with plots."),
    ]
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}', choose one of: {', '.join(STAGES)}")
    return STAGES[name]


def config_fingerprint(cfg: StageConfig) -> str:
    # Ray placement is not part of what a stage computes, so moving a job to a cluster still resumes.
    data = cfg.model_dump(mode="json", exclude={"ray"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def completed_outputs(cfg: StageConfig) -> dict[str, str] | None:
    """Outputs of a finished run with this exact config, or None. A finished run with another config is an
    error: it would be clobbered."""
    marker = Path(cfg.output_dir) / DONE_MARKER
    if not marker.exists():
        return None
    done = json.loads(marker.read_text(encoding="utf-8"))
    if done.get("config_fingerprint") != config_fingerprint(cfg):
        raise ConfigError(
            f"invalid config field 'output_dir': {cfg.output_dir} holds a finished run with a different config; "
            "choose a new output_dir or delete the old one")
    return done["outputs"]


def run_stage(stage: Stage, cfg: StageConfig, ray_address: str | None = None) -> dict[str, str]:
    """Run one stage: skip if finished, else run (stages resume their own partial work), then write the lineage
    manifest and the done marker last, so a killed run is never mistaken for a finished one."""
    done = completed_outputs(cfg)
    if done is not None:
        log.warning("[%s] already complete in %s; reusing its outputs", stage.name, cfg.output_dir)
        return done
    if stage.uses_ray:
        from definemed.ray_utils import init_ray

        init_ray(cfg.ray, address=ray_address)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # after Ray: a failed start leaves no empty dir
    outputs = stage.run_fn()(cfg)
    outputs = {k: str(v) for k, v in outputs.items()}
    manifest = write_manifest(cfg.output_dir, stage.name, cfg, inputs=cfg.lineage_inputs(),
                              extra={"outputs": outputs})
    outputs.setdefault("lineage", str(manifest))
    atomic_write_json(Path(cfg.output_dir) / DONE_MARKER,
                      {"stage": stage.name, "config_fingerprint": config_fingerprint(cfg), "outputs": outputs})
    return outputs
