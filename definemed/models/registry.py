"""Resolve a model reference to a local directory that transformers, vLLM and mergekit all load.

``tiny://<name>[@seed]`` builds (once, cached on disk) a small randomly initialised model of a real
architecture. ``real://<name>`` converts (once, cached on disk) a real pretrained model that a registry package
ships. Anything else is a local path or a hub id and is returned unchanged, so real models go through the same
loading code.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

TINY_PREFIX = "tiny://"
REAL_PREFIX = "real://"
TINY_MARKER = "TINY_MODEL.md"


def is_tiny_ref(ref: str) -> bool:
    return str(ref).startswith(TINY_PREFIX)


def parse_tiny_ref(ref: str) -> tuple[str, int]:
    body = str(ref)[len(TINY_PREFIX):]
    name, _, seed = body.partition("@")
    return name, int(seed) if seed else 0


def model_dir(ref: str) -> Path:
    """The cache directory a tiny:// or real:// reference resolves to, without building or converting it."""
    if is_tiny_ref(ref):
        from definemed.models.tiny import tiny_dir

        return tiny_dir(*parse_tiny_ref(ref))
    from definemed.models.real import converted_dir, real_spec

    return converted_dir(real_spec(ref))


def fingerprint_ref(value: str | os.PathLike) -> str:
    """`lineage.fingerprint_input`, except that a tiny:// or real:// model is known by the cache directory it
    resolves to, whose name encodes everything its weights depend on (spec, seed and tokenizer corpus; package
    sha256 and converter version): no model is built to fingerprint a stage's inputs."""
    from definemed.lineage import fingerprint_input

    s = str(value)
    if is_tiny_ref(s) or s.startswith(REAL_PREFIX):
        return "model:" + model_dir(s).name
    return fingerprint_input(s)


def resolve_model(ref: str | os.PathLike) -> str:
    ref = str(ref)
    if is_tiny_ref(ref):
        from definemed.models.tiny import build_tiny_model

        name, seed = parse_tiny_ref(ref)
        return str(build_tiny_model(name, seed=seed))
    if ref.startswith(REAL_PREFIX):
        from definemed.models.real import resolve_real

        return str(resolve_real(ref))
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def is_meaningless_model(ref: str | os.PathLike | None) -> bool:
    """True when a model's outputs carry no meaning: a tiny random model, or one trained or merged from one.

    The one definition every report, plot title and log line uses. A directory counts when it carries the tiny
    marker, or when its lineage manifest (or its stage's, one or two levels up) names a tiny:// model.
    """
    if not ref:
        return False
    s = str(ref)
    if is_tiny_ref(s):
        return True
    if "://" in s:
        return False
    p = Path(s)
    if not p.exists():
        return False
    if (p / TINY_MARKER).exists():
        return True
    for d in (p, p.parent, p.parent.parent):
        f = d / "lineage.json"
        if f.exists() and TINY_PREFIX in f.read_text(encoding="utf-8", errors="ignore"):
            return True
    return False


def looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s))


def check_model_ref(value: str) -> str:
    """Validate a model reference without building anything: a known tiny:// or real:// name, a hub id, or a
    local path (whose existence the caller's path validator checks). Raises ValueError (one line)."""
    s = str(value).strip()
    if not s:
        raise ValueError("empty model reference")
    if is_tiny_ref(s):
        from definemed.models.tiny import SPECS

        name, _ = parse_tiny_ref(s)
        if name not in SPECS:
            raise ValueError(f"unknown tiny model '{name}', choose one of {sorted(SPECS)}")
    elif s.startswith(REAL_PREFIX):
        from definemed.models.real import real_spec

        real_spec(s)  # ModelRefError is a ValueError: pydantic reports it against the field
    return s


def _validate_model_ref(value: str, info) -> str:
    from definemed.config import _check_input_path

    s = check_model_ref(value)
    if "://" in s:
        return s
    if looks_like_hub_id(s) and not Path(s).exists():
        return s  # a hub id, resolved where the stage runs
    return _check_input_path(s, info)  # a local path must exist, unless an earlier pipeline stage writes it


def _model_ref_type():
    from pydantic import AfterValidator
    from typing_extensions import Annotated

    from definemed.config import LINEAGE_INPUT

    return Annotated[str, AfterValidator(_validate_model_ref), LINEAGE_INPUT]  # fingerprinted as a stage input


#: The one model-reference field type of every stage config: tiny://name[@seed], real://name, a hub id
#: ("Org/name") or a local path that must exist (unless a preceding pipeline stage produces it).
ModelRef = _model_ref_type()


def has_chat_template(ref: str) -> bool | None:
    """Whether a model's tokenizer carries a chat template, without building or converting it; None when that
    cannot be known yet (a hub id, or a path an earlier pipeline stage will write)."""
    s = str(ref)
    if is_tiny_ref(s):
        name, _ = parse_tiny_ref(s)
        return name != "xlm-roberta"
    if s.startswith(REAL_PREFIX):
        from definemed.models.real import real_spec

        real_spec(s)
        return True  # from the spec or the GGUF's metadata; conversion fails without one
    p = Path(s)
    if not p.is_dir():
        return None
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return True
    cfg = p / "tokenizer_config.json"
    if cfg.is_file():
        import json

        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
    return None
