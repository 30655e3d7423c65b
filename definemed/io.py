"""Atomic outputs: a crash never leaves a half-written file or directory behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with _atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `final` only if the block succeeds.

    The temporary directory sits next to `final` so the rename stays on one filesystem.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"output already exists: {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_parquet_atomic(table, path: str | os.PathLike) -> Path:
    """Write a pyarrow Table to `path` via a temp file + rename."""
    import pyarrow.parquet as pq

    with _atomic_target(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def remove_orphans(root: str | os.PathLike, depth: int = 2) -> list[Path]:
    """Delete what the atomic writers above leave behind when their process is killed (`.<name>.tmp-*` and
    `.<name>.old-*` directories, `.<name>.<id>.tmp` files) under `root`, down to `depth` levels. Call it only
    while holding `output_lock(root)`: then no live writer owns them."""
    root = Path(root)
    found: list[Path] = []
    dirs = [root]
    for _ in range(depth):
        nxt = []
        for d in dirs:
            for p in d.iterdir() if d.is_dir() else []:
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")):
                    found.append(p)
                elif p.is_dir() and not p.is_symlink():
                    nxt.append(p)
        dirs = nxt
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on an output directory for one run. The kernel drops it when the holder dies, so a
    second run can tell a dead run's leftovers from a live run's work; a live holder is refused at once."""
    from filelock import FileLock, Timeout

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        from definemed.config import ConfigError

        raise ConfigError(f"invalid config field 'output_dir': another run is writing to {out}; wait for it or "
                          "choose another output_dir") from None
    try:
        yield
    finally:
        lock.release()
