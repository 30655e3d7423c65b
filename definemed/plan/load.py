"""Load the configs to plan, validated like a run would validate them, except that paths need not exist yet:
planning happens before the cluster (and its /models, /data volumes) does."""
from __future__ import annotations

from typing import Any

from definemed.config import ConfigError, RayConfig, load_yaml, parse_config

SERVE = "serve"


def _model(stage: str):
    if stage == SERVE:
        from serve.config import ServeConfig

        return ServeConfig
    from definemed.stages import get_stage

    return get_stage(stage).config_model()


def load_stages(path: str, stage: str | None = None) -> tuple[list[tuple[str, Any]], RayConfig]:
    """[(stage name, config)] in run order, and the Ray settings the stages would use."""
    data = load_yaml(path)
    if stage is not None:
        cfg = parse_config(_model(stage), data, source=path, context={"plan_only": True})
        return [(stage, cfg)], cfg.ray
    if "stages" not in data:
        raise ConfigError(f"{path}: not a pipeline config (no 'stages'); name the stage with --stage")
    from definemed.stages import STAGES

    ray_cfg = parse_config(RayConfig, data.get("ray") or {}, source=f"{path} [ray]")
    sections: dict[str, Any] = data.get("stages") or {}
    unknown = [n for n in sections if n not in STAGES]
    if unknown:
        raise ConfigError(f"{path}: invalid config field 'stages.{unknown[0]}': unknown stage")
    out, produced = [], []
    for name in (n for n in STAGES if n in sections):
        sec = sections[name]
        if isinstance(sec, str):  # a stage section may name that stage's own YAML
            sec = load_yaml(sec)
            sec.pop("ray", None)
        cfg = parse_config(_model(name), dict(sec or {}), source=f"{path} [stages.{name}]",
                           context={"plan_only": True, "deferred_paths": tuple(produced)})
        out.append((name, cfg))
        produced.append(cfg.output_dir)
    return out, ray_cfg
