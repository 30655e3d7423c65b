"""The on-disk cache of built artifacts (tiny models, converted real models): where it is and how an entry is
built once when several processes ask for it at the same time."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    root = os.environ.get("DEFINEMED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "definemed")
    return Path(root)


def build_once(out: Path, build: Callable[[Path], None], force: bool = False) -> Path:
    """`out` if it exists, else `build(out)` under a file lock, so concurrent processes (Ray workers, parallel
    tests) build a cached entry once and the others wait for it."""
    from filelock import FileLock

    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.exists() or force:
            build(out)
    return out
