"""mergekit's private loader cache, as our adapter relies on it: fails loudly when mergekit changes it."""
from __future__ import annotations


def test_release_loaders_empties_mergekits_process_wide_cache(tiny_qwen2):
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache

    from definemed.merge.mergekit_adapter import release_loaders

    assert isinstance(LoaderCache.__dict__.get("loaders"), dict), "mergekit moved LoaderCache.loaders"
    cache = LoaderCache()
    cache.get(ModelReference.parse(tiny_qwen2))
    assert len(LoaderCache.loaders) >= 1, "LoaderCache.get no longer fills LoaderCache.loaders"
    release_loaders()
    assert LoaderCache.loaders == {}
    assert LoaderCache() is cache  # still one instance per thread: clearing the class dict reaches it
