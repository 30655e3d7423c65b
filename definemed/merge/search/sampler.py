"""Optuna's NSGA-II, picklable: Tune pickles the searcher, its sampler included, into the experiment checkpoint
that a resumed search restores, and optuna 5.1's genetic samplers hold a `threading.Lock` (`_thread_lock`) that
pickle refuses. The lock only guards generation bookkeeping within one process, so a restored sampler gets a new
one. tests/test_merge_search.py fails loudly if optuna renames it."""
from __future__ import annotations

import threading

from optuna.samplers import NSGAIISampler


class NSGAII(NSGAIISampler):
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
