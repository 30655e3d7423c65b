"""Validated, YAML-loaded stage configs.

Every user-facing config is a pydantic model that validates before any work starts (mergekit style).
An invalid config raises ConfigError whose message is one line naming the field; the CLI exits 2 on it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Type, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from typing_extensions import Annotated

T = TypeVar("T", bound="StrictModel")


class ConfigError(ValueError):
    """A config that must not run. str() is a single line naming the offending field."""


class StrictModel(BaseModel):
    """Base for every config: unknown keys and silent type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True, frozen=False)


class RayConfig(StrictModel):
    """Where the stage runs. address=None starts a local Ray in-process with explicit logical resources."""

    address: str | None = None
    num_cpus: int = 8  # logical: the 2 physical cores are oversubscribed so Serve's ingress replica schedules
    num_gpus: int | None = None
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = False
    namespace: str = "definemed"
    runtime_env: dict[str, Any] | None = None
    # Ray Data reads each parquet dataset's footers on a pool of actors it starts per read (Ray 2.60 default 32:
    # sized for many files on object storage). None: 1 for a local Ray, where 32 process starts cost ~10 s per
    # read on 2 cores; Ray's own default when joining a cluster.
    parquet_footer_actors: int | None = Field(default=None, ge=1)


def hub_offline() -> bool:
    """Hugging Face Hub access is off unless HF_HUB_OFFLINE says otherwise: definemed's Ray runtime_env,
    infra/runtime_env.yaml and the image all set HF_HUB_OFFLINE=1 (hospital networks reach no hub)."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off", "")


def check_remote(s: str) -> str:
    """A remote URI that cannot be read where the stage runs is a config error, not a failure hours later."""
    if s.startswith("hf://") and hub_offline():
        raise ValueError(f"{s} needs the Hugging Face Hub, but HF_HUB_OFFLINE=1 (set by definemed, "
                         "infra/runtime_env.yaml and the image); mirror it to /data or s3:// and point here")
    return s


def existing_path(value: str | os.PathLike) -> str:
    """Validator helper: local paths must exist; remote URIs (s3://, gs://, ...) are passed through, hf:// only
    when hub access is on."""
    s = str(value)
    if "://" in s:
        return check_remote(s)
    if any(ch in s for ch in "*?["):
        return s
    if not Path(s).expanduser().exists():
        raise ValueError(f"path does not exist: {s}")
    return s


def _check_input_path(value: str, info: ValidationInfo) -> str:
    """Inputs must exist before work starts, except paths a preceding pipeline stage will produce."""
    s = str(value)
    context = (info.context or {}) if info is not None else {}
    deferred = context.get("deferred_paths", ())
    if any(s == d or s.startswith(str(d).rstrip("/") + "/") for d in deferred):
        return s
    if context.get("plan_only"):  # `definemed plan` runs before the cluster's volumes exist
        return check_remote(s)
    return existing_path(s)


class _LineageInput:
    """Marks a config field whose value a stage reads: it is fingerprinted into lineage and `_DONE.json`, so a
    finished stage is reused only while these inputs are unchanged."""

    def __repr__(self) -> str:
        return "LineageInput"


LINEAGE_INPUT = _LineageInput()

#: A path (or glob / remote URI) that must exist locally before the stage runs.
InputPath = Annotated[str, AfterValidator(_check_input_path), LINEAGE_INPUT]


def _is_lineage_input(annotation: Any) -> bool:
    return any(m is LINEAGE_INPUT for m in getattr(annotation, "__metadata__", ()))


def collect_lineage_inputs(model: BaseModel, prefix: str = "") -> dict[str, str]:
    """Every InputPath / ModelRef value in a config, nested sections and lists included, by dotted name."""
    import typing

    out: dict[str, str] = {}

    def visit(name: str, annotation: Any, value: Any) -> None:
        if value is None:
            return
        if _is_lineage_input(annotation):
            out[name] = str(value)
            return
        if isinstance(value, BaseModel):
            out.update(collect_lineage_inputs(value, prefix=f"{name}."))
            return
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if isinstance(value, (list, tuple)) and args:
            for i, v in enumerate(value):
                visit(f"{name}[{i}]", args[0], v)
        elif isinstance(value, dict) and len(args) == 2:
            for k, v in value.items():
                visit(f"{name}.{k}", args[1], v)
        elif args:  # Optional[X] / unions: the first member that marks inputs decides
            for a in args:
                if _is_lineage_input(a):
                    out[name] = str(value)
                    return

    for fname, field in type(model).model_fields.items():
        if fname == "ray":
            continue
        ann = field.annotation
        if any(m is LINEAGE_INPUT for m in field.metadata):
            value = getattr(model, fname)
            if value is not None:
                out[prefix + fname] = str(value)
            continue
        visit(prefix + fname, ann, getattr(model, fname))
    return out


def not_below(lower: str, field: str):
    """A field validator for a (min, max) pair: `field` must be >= the earlier field `lower`; the error names
    `field`. Use as `_bounds = not_below("min_actors", "max_actors")` in the class body."""

    def check(cls, v, info: ValidationInfo):
        lo = info.data.get(lower)
        if lo is not None and v is not None and v < lo:
            raise ValueError(f"must be >= {lower} ({lo})")
        return v

    return field_validator(field)(classmethod(check))


class StageConfig(StrictModel):
    """Common shape of a stage config: where it writes, and where Ray runs."""

    output_dir: str
    ray: RayConfig = RayConfig()

    def lineage_inputs(self) -> dict[str, str]:
        """What the stage reads, by field name: every InputPath / ModelRef field, nested ones included.
        Fingerprinted into lineage.json and _DONE.json (definemed.stages decides reuse from them)."""
        return collect_lineage_inputs(self)


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """One line naming the first offending field (and how many more there are)."""
    errors = err.errors()
    first = errors[0]
    loc = _field_path(first.get("loc", ()))
    msg = first.get("msg", "invalid").replace("\n", " ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f"{source}: " if source else ""
    return f"{where}invalid config field '{loc}': {msg}{more}"


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise ConfigError(f"{p}: not valid YAML" + (f" (line {line + 1})" if line is not None else "")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_config(model: Type[T], data: dict[str, Any], source: str | None = None,
                 context: dict[str, Any] | None = None) -> T:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(model: Type[T], path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> T:
    """Load YAML into `model`. Relative paths in the YAML stay relative to the working directory (Ray jobs run
    from --working-dir), matching `ray job submit` conventions."""
    data = load_yaml(path)
    if overrides:
        data = deep_merge(data, overrides)
    return parse_config(model, data, source=str(path))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


__all__ = [
    "ConfigError",
    "StrictModel",
    "RayConfig",
    "StageConfig",
    "InputPath",
    "collect_lineage_inputs",
    "existing_path",
    "field_validator",
    "not_below",
    "load_config",
    "load_yaml",
    "parse_config",
    "deep_merge",
    "format_validation_error",
]
