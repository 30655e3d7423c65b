"""The one place that reaches into mergekit's private state.

mergekit keeps open safetensors loaders in a process-wide `LoaderCache` (a singleton whose class attribute
`loaders` maps model references to loaders with open files and tensor indexes) and offers `flush_all()`, which
only flushes them. Ray reuses a worker process for later merge tasks (the eval stage's frontier runs several in
a row): without emptying the cache every merged model's files stay open, and a model rewritten at the same path
(a re-exported CPT model) would be read through its old index. There is no public API for that; this adapter
clears the private dict, and tests/test_merge_adapter.py fails loudly when mergekit changes it.
"""
from __future__ import annotations


def release_loaders() -> None:
    """Flush and forget every loader mergekit cached in this process."""
    from mergekit.io.tasks import LoaderCache

    LoaderCache().flush_all()
    loaders = getattr(LoaderCache, "loaders", None)
    if not isinstance(loaders, dict):
        raise RuntimeError("mergekit's LoaderCache.loaders is no longer a dict: update "
                           "definemed/merge/mergekit_adapter.py for this mergekit version")
    loaders.clear()
