"""Chain stages. Each stage section is that stage's own config, so a pipeline YAML is just the stage YAMLs
side by side; inputs produced by an earlier stage are allowed not to exist yet at validation time."""
from __future__ import annotations

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


def run_pipeline(p: PipelineConfig, ray_address: str | None = None) -> dict[str, dict[str, str]]:
    """Run the stages in order, like `dvc repro`: a finished stage is reused only while its config and inputs are
    unchanged; a stage whose inputs changed is recomputed (the log says which input), and since that gives it a
    new run id, every stage downstream of it is recomputed too."""
    results: dict[str, dict[str, str]] = {}
    for name, cfg in p.stages.items():
        print(f"\n=== stage {name} -> {cfg.output_dir} ===", flush=True)
        results[name] = run_stage(STAGES[name], cfg, ray_address=ray_address, on_stale="rerun")
    return results
