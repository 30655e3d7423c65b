"""The stage registry and the one way every stage runs (CLI, jobs/, pipeline).

A stage is a config model plus a ``run(cfg) -> dict[str, str]`` returning named output paths. Both are given
as import strings so `definemed --help` stays fast and a stage's heavy imports load only when it runs.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from definemed.config import ConfigError, StageConfig
from definemed.console import requery_library_handlers, stage_log
from definemed.io import atomic_write_json, output_lock, remove_orphans
from definemed.lineage import DONE_MARKER, describe_inputs, write_manifest
from definemed.models.registry import fingerprint_ref

log = logging.getLogger(__name__)
RUN_MARKER = "_RUN.json"  # written when a run starts: partial work in output_dir belongs to these inputs


@dataclass(frozen=True)
class Stage:
    name: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function"
    help: str
    uses_ray: bool = True
    # "module:function(cfg)": checks of the inputs that write nothing (tokenizers, sizes), run before the stage's
    # lock and log so that a rejected input is one line and exit 2
    preflight: str | None = None

    def config_model(self) -> type[StageConfig]:
        return _load(self.config)

    def run_fn(self) -> Callable[[Any], dict[str, str]]:
        return _load(self.run)


def _load(target: str):
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


# Pipeline order.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("tiny-models", "definemed.models.stage:TinyModelsConfig", "definemed.models.stage:run",
              "Build (or reuse) the cached tiny offline models and check they load.", uses_ray=False),
        Stage("annotate", "definemed.corpus.config:AnnotateConfig", "definemed.corpus.stage:run_annotate",
              "Label a seeded sample medical/non-medical with an LLM (Ray Data + vLLM or an OpenAI endpoint); "
              "quality report vs human labels."),
        Stage("classify-train", "definemed.corpus.config:ClassifyConfig", "definemed.corpus.stage:run_classify",
              "Fine-tune the XLM-R medical classifier under Ray Train; threshold sweep, PR curve, HF model dir."),
        Stage("filter", "definemed.corpus.config:FilterConfig", "definemed.corpus.stage:run_filter",
              "Score the corpus with the classifier (autoscaling actor pool), keep >= threshold, dedup, "
              "decontaminate, redact PII: FineMed-de + stats."),
        Stage("tokenizers", "definemed.tokenizers.config:TokenizersConfig", "definemed.tokenizers.stage:run",
              "Tokenizer fertility (tokens per word), split share and parity against English per model family, "
              "on FineMed-de, general German and parallel medical sentences; table and plot.", uses_ray=False),
        Stage("pack", "definemed.train.pack:PackConfig", "definemed.train.pack:run",
              "Hold out part of FineMed-de by a seeded id hash, tokenize the rest on Ray Data (BOS/EOS per "
              "document) and bin-pack it best-fit-decreasing into constant-length sequences."),
        Stage("cpt", "definemed.train.cpt:CptConfig", "definemed.train.cpt:run",
              "Continual pre-training on Ray Train: FSDP2/HSDP, micro batch 1, sharded checkpoints with "
              "automatic resume, MFU metrics, HF safetensors export."),
        Stage("merge", "definemed.merge.config:MergeStageConfig", "definemed.merge.run:run",
              "SLERP-merge the CPT model back into its instruct model (mergekit, layer-wise schedule, Ray task)."),
        Stage("merge-search", "definemed.merge.search.config:MergeSearchConfig", "definemed.merge.search.run:run",
              "Search merge recipes on Ray Tune (Optuna's multi-objective sampler) for medical gain, instruction "
              "following and language confusion at once; Pareto front on dev, re-scored on test."),
        Stage("prune", "definemed.distill.prune:PruneConfig", "definemed.distill.prune:run",
              "Cut a student from the teacher: drop the blocks of lowest block importance (depth) or the MLP "
              "channels of lowest activation importance (width), measured on training-side calibration rows.",
              preflight="definemed.distill.prune:check_inputs"),
        Stage("distill", "definemed.distill.stage:DistillConfig", "definemed.distill.stage:run",
              "Knowledge distillation on Ray Train (CPT's FSDP2 loop): (1 - alpha) CE + alpha T^2 KL against a "
              "frozen teacher (replicated or sharded), and a CE-only control on the same tokens.",
              preflight="definemed.distill.stage:check_inputs"),
        Stage("serve-demo", "serve.demo:ServeDemoConfig", "serve.demo:run",
              "Serve the merged model behind the secured OpenAI endpoint, ask one German clinical question, stop."),
        Stage("eval", "definemed.eval.config:EvalConfig", "definemed.eval.stage:run",
              "MMLU-de/MedQA-de letter scoring, held-out perplexity, the SLERP merge frontier, pairwise LLM-judge "
              "win-rate (both orders, LC), failure modes; one Markdown/HTML report with plots."),
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


class StaleOutputsError(ConfigError):
    """A finished (or partly done) run in output_dir was made from other inputs; reusing it would be wrong."""


@dataclass(frozen=True)
class Decision:
    """What the runner does with an output_dir: `reuse` a finished run, `resume` partial work made from the
    same config and inputs, `run` from scratch, or `rerun` (outputs exist but are stale; `why` says which input)."""

    action: str
    why: str = ""
    done: dict[str, Any] | None = None
    run_id: str | None = None


def _changed_inputs(recorded: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    if recorded is None:
        return ["(no input fingerprints recorded)"]
    names = sorted(set(recorded) | set(current))
    return [n for n in names if recorded.get(n) != current.get(n)]


def _describe_change(name: str, cfg: StageConfig, recorded: dict[str, str] | None, current: dict[str, str]) -> str:
    if name.startswith("("):
        return "its outputs predate input tracking " + name
    old, new = (recorded or {}).get(name), current.get(name)
    path = cfg.lineage_inputs().get(name, "?")
    if old is None:
        return f"input '{name}' ({path}) is new"
    if new is None:
        return f"input '{name}' is gone"
    if old.startswith("run:") and new.startswith("run:"):
        return f"input '{name}' ({path}) was remade by its stage (run {old[4:]} -> {new[4:]})"
    return f"input '{name}' ({path}) changed"


def decide(cfg: StageConfig, inputs: dict[str, str]) -> Decision:
    """Compare output_dir's markers with this config and these input fingerprints."""
    out = Path(cfg.output_dir)
    fp = config_fingerprint(cfg)
    for marker, found in ((DONE_MARKER, "reuse"), (RUN_MARKER, "resume")):
        path = out / marker
        if not path.exists():
            continue
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("config_fingerprint") != fp:
            if found == "resume":
                return Decision("rerun", "partial outputs from a different config")
            raise ConfigError(
                f"invalid config field 'output_dir': {cfg.output_dir} holds a finished run with a different config; "
                "choose a new output_dir or delete the old one")
        changed = _changed_inputs(rec.get("inputs"), inputs)
        if changed:
            why = "; ".join(_describe_change(n, cfg, rec.get("inputs"), inputs) for n in changed)
            return Decision("rerun", why, rec if found == "reuse" else None)
        return Decision(found, done=rec if found == "reuse" else None, run_id=rec.get("run_id"))
    return Decision("run")


def _set_aside(out: Path) -> Path | None:
    """Move stale outputs to a hidden sibling; it is deleted only after the new run finished."""
    if not out.exists():
        return None
    aside = out.parent / f".{out.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    os.replace(out, aside)
    return aside


def _drop_replaced(out: Path) -> None:
    for old in out.parent.glob(f".{out.name}.replaced-*"):
        shutil.rmtree(old, ignore_errors=True)


def completed_outputs(cfg: StageConfig) -> dict[str, str] | None:
    """Outputs of a finished run with this config and unchanged inputs, else None."""
    d = decide(cfg, input_fingerprints(cfg))
    return d.done["outputs"] if d.action == "reuse" and d.done else None


def input_fingerprints(cfg: StageConfig) -> dict[str, str]:
    return {k: fingerprint_ref(v) for k, v in cfg.lineage_inputs().items()}


def run_stage(stage: Stage, cfg: StageConfig, ray_address: str | None = None,
              on_stale: Literal["refuse", "rerun"] = "refuse", rerun: bool = False) -> dict[str, str]:
    """Run one stage unless a finished run with the same config and the same inputs is there.

    Stale outputs (an input changed since they were made) are refused with one line naming the input
    (`on_stale="refuse"`, single-stage commands), or recomputed (`"rerun"`, the pipeline, or `rerun=True`). A
    recomputation never overwrites old outputs in place: they move to a hidden sibling that is deleted only
    when the new run finishes. The lineage manifest and `_DONE.json` are written last, so a killed run is never
    mistaken for a finished one; a killed run resumes its own partial work when config and inputs still match.
    """
    out = Path(cfg.output_dir)
    inputs = input_fingerprints(cfg)
    d = decide(cfg, inputs)
    if rerun and d.action in ("reuse", "resume"):
        d = Decision("rerun", "--rerun was given")
    if d.action == "reuse":
        log.warning("[%s] already complete in %s (config and inputs unchanged); reusing its outputs",
                    stage.name, cfg.output_dir)
        return d.done["outputs"]
    if stage.preflight:
        _load(stage.preflight)(cfg)
    if d.action == "rerun" and d.done is not None and on_stale == "refuse" and not rerun:
        raise StaleOutputsError(
            f"{cfg.output_dir} holds outputs made from other inputs: {d.why}; pass --rerun to recompute them "
            "(the old outputs are kept until the new run finishes)")
    if d.action == "rerun":
        log.warning("[%s] recomputing %s: %s", stage.name, cfg.output_dir, d.why)
        aside = _set_aside(out)
        if aside is not None:
            log.warning("[%s] previous outputs kept at %s until this run finishes", stage.name, aside)
    run_id = d.run_id if d.action == "resume" and d.run_id else uuid.uuid4().hex[:12]
    with output_lock(out), stage_log(stage.name, cfg.output_dir):
        orphans = remove_orphans(out)
        if orphans:
            log.warning("[%s] removed %d temporary files/directories left by a killed run in %s", stage.name,
                        len(orphans), out)
        if stage.uses_ray:
            from definemed.ray_utils import init_ray

            init_ray(cfg.ray, address=ray_address)
            requery_library_handlers()
        described = describe_inputs(cfg.lineage_inputs(), fingerprint_ref)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_MARKER, {"stage": stage.name, "run_id": run_id,
                                             "config_fingerprint": config_fingerprint(cfg), "inputs": inputs})
        outputs = stage.run_fn()(cfg)
    outputs = {k: str(v) for k, v in outputs.items()}
    manifest = write_manifest(cfg.output_dir, stage.name, cfg, described_inputs=described,
                              extra={"outputs": outputs, "run_id": run_id})
    outputs.setdefault("lineage", str(manifest))
    atomic_write_json(out / DONE_MARKER, {"stage": stage.name, "run_id": run_id,
                                          "config_fingerprint": config_fingerprint(cfg), "inputs": inputs,
                                          "outputs": outputs})
    (out / RUN_MARKER).unlink(missing_ok=True)
    _drop_replaced(out)
    return outputs
