"""Resolve a model reference to a local directory that transformers, vLLM and mergekit all load.

``tiny://<name>[@seed]`` builds (once, cached on disk) a small randomly initialised model of a real
architecture. Anything else is a local path or a hub id and is returned unchanged, so real models go through
the same loading code.
"""
from __future__ import annotations

import os
from pathlib import Path

TINY_PREFIX = "tiny://"


def cache_root() -> Path:
    root = os.environ.get("DEFINEMED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "definemed")
    return Path(root)


def is_tiny_ref(ref: str) -> bool:
    return str(ref).startswith(TINY_PREFIX)


def parse_tiny_ref(ref: str) -> tuple[str, int]:
    body = str(ref)[len(TINY_PREFIX):]
    name, _, seed = body.partition("@")
    return name, int(seed) if seed else 0


def resolve_model(ref: str | os.PathLike) -> str:
    ref = str(ref)
    if is_tiny_ref(ref):
        from definemed.models.tiny import build_tiny_model

        name, seed = parse_tiny_ref(ref)
        return str(build_tiny_model(name, seed=seed))
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref
