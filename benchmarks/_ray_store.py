"""Object-store use and spilled bytes of a local Ray node, for the benchmarks.

Ray has no public API for these numbers (`ray memory --stats-only` prints them from the same internal call), so
this one adapter holds the private import; tests/test_corpus_scale_bench.py fails loudly when Ray changes it.
"""
from __future__ import annotations


def store_stats(address: str) -> dict[str, int]:
    """bytes used now, bytes spilled so far, bytes restored so far (this node's plasma store)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    s = get_memory_info_reply(get_state_from_address(address)).store_stats
    return {"used": int(s.object_store_bytes_used), "spilled": int(s.spilled_bytes_total),
            "restored": int(s.restored_bytes_total)}
