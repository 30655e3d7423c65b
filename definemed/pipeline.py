"""Chain stages. Each stage section is that stage's own config, so a pipeline YAML is just the stage YAMLs
side by side; inputs produced by an earlier stage are allowed not to exist yet at validation time."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from definemed.config import ConfigError, RayConfig, StageConfig, load_yaml, parse_config
from definemed.stages import STAGES, run_stage


class PipelineConfig:
    def __init__(self, ray: RayConfig, stages: dict[str, StageConfig], source: str):
        self.ray, self.stages, self.source = ray, stages, source


def load_pipeline(path: str, only: list[str] | None = None) -> PipelineConfig:
    data = load_yaml(path)
    unknown = set(data) - {"ray", "stages"}
    if unknown:
        raise ConfigError(f"{path}: invalid config field '{sorted(unknown)[0]}': unknown key")
    ray_cfg = parse_config(RayConfig, data.get("ray") or {}, source=f"{path} [ray]")
    sections: dict[str, Any] = data.get("stages") or {}
    if not isinstance(sections, dict) or not sections:
        raise ConfigError(f"{path}: invalid config field 'stages': must map stage names to configs")
    for name in sections:
        if name not in STAGES:
            raise ConfigError(f"{path}: invalid config field 'stages.{name}': unknown stage "
                              f"(choose from {', '.join(STAGES)})")
    if only:
        for name in only:
            if name not in sections:
                raise ConfigError(f"--only: stage '{name}' is not in {path}")
    order = [n for n in STAGES if n in sections and (not only or n in only)]
    produced: list[str] = []
    stages: dict[str, StageConfig] = {}
    for name in order:
        if isinstance(sections[name], str):
            # A stage section may name that stage's own YAML (e.g. configs/cluster/cpt.yaml): one source of truth.
            # Its `ray` block is dropped because the pipeline's top-level `ray` runs every stage.
            sec = load_yaml(sections[name])
            sec.pop("ray", None)
        else:
            sec = dict(sections[name] or {})
        if "ray" in sec:
            raise ConfigError(f"{path}: invalid config field 'stages.{name}.ray': set ray once at the top level")
        cfg = parse_config(STAGES[name].config_model(), sec, source=f"{path} [stages.{name}]",
                           context={"deferred_paths": tuple(produced)})
        stages[name] = cfg.model_copy(update={"ray": ray_cfg})
        produced.append(cfg.output_dir)
    return PipelineConfig(ray_cfg, stages, path)


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def timings_path(p: PipelineConfig) -> Path:
    """`pipeline_timings.json` in the deepest directory that holds every stage's output_dir."""
    dirs = [str(Path(c.output_dir).resolve()) for c in p.stages.values()]
    return Path(os.path.commonpath(dirs)) / "pipeline_timings.json"


def run_pipeline(p: PipelineConfig, ray_address: str | None = None) -> dict[str, dict[str, str]]:
    """Run the stages in order, like `dvc repro`: a finished stage is reused only while its config and inputs are
    unchanged; a stage whose inputs changed is recomputed (the log says which input), and since that gives it a
    new run id, every stage downstream of it is recomputed too.

    Each stage's wall time and the 1-minute load average before and after it are printed and written to
    `pipeline_timings.json` beside the outputs: a time taken while other work shared the machine says so."""
    from definemed.io import atomic_write_json

    results: dict[str, dict[str, str]] = {}
    rows: list[dict] = []
    start = time.perf_counter()
    for name, cfg in p.stages.items():
        print(f"\n=== stage {name} -> {cfg.output_dir} ===", flush=True)
        load0, t0 = _load(), time.perf_counter()
        results[name] = run_stage(STAGES[name], cfg, ray_address=ray_address, on_stale="rerun")
        rows.append({"stage": name, "seconds": round(time.perf_counter() - t0, 1), "load_before": load0,
                     "load_after": _load()})
        print(f"=== stage {name}: {rows[-1]['seconds']:.0f} s (load average {load0} -> {rows[-1]['load_after']})",
              flush=True)
        atomic_write_json(timings_path(p), {"config": p.source, "stages": rows,
                                            "total_seconds": round(time.perf_counter() - start, 1)})
    return results
