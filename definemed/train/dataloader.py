"""Deterministic, rank-sharded, resumable reader of packed shards.

The global order is a pure function of (seed, epoch): shards in a seeded permutation, rows inside each shard in
a seeded permutation. Step s takes the next dp_world * grad_accum sequences of that order; micro-batch m of
data-parallel rank r gets sequence s*W*A + m*W + r. The whole data position is therefore one number (the next
step), which the checkpoint stores: a resumed run sees no skipped and no repeated batches, and needs to load
only the shards it is currently reading (never the whole corpus).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from definemed.train.loss import packed_labels


@dataclass
class MicroBatch:
    seq_id: int  # global id: row index in the concatenation of the shards in file order
    input_ids: Any  # torch.LongTensor [1, seq_len]
    position_ids: Any
    labels: Any


class PackedShards:
    """Row counts of the packed Parquet shards (file order = part-NNNNN order) and cached row access."""

    def __init__(self, path: str | os.PathLike):
        import pyarrow.parquet as pq

        p = Path(path)
        self.files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        if not self.files:
            raise FileNotFoundError(f"no packed shards in {p}")
        self.rows = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        if self.total == 0:
            raise ValueError(f"packed shards in {p} hold no sequences")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def shard(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if i not in self._cache:
            import pyarrow.parquet as pq

            t = pq.read_table(self.files[i], columns=["input_ids", "position_ids", "num_tokens"])
            n = t.num_rows
            ids = t.column("input_ids").combine_chunks().flatten().to_numpy().reshape(n, -1)
            pos = t.column("position_ids").combine_chunks().flatten().to_numpy().reshape(n, -1)
            ntok = t.column("num_tokens").to_numpy()
            if len(self._cache) >= 2:  # readers move through shards in order; keep the current and next
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = (ids, pos, ntok)
        return self._cache[i]


class PackedDataLoader:
    def __init__(self, path: str | os.PathLike, dp_rank: int, dp_world: int, grad_accum: int, seed: int):
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} outside world {dp_world}")
        self.data = PackedShards(path)
        self.dp_rank, self.dp_world, self.grad_accum, self.seed = dp_rank, dp_world, grad_accum, seed
        self._perm_cache: dict[tuple, np.ndarray] = {}

    @property
    def sequences_per_step(self) -> int:
        return self.dp_world * self.grad_accum

    def _perm(self, *key: int) -> np.ndarray:
        if key not in self._perm_cache:
            n = self.data.total if len(key) == 1 else self.data.rows[key[1]]
            size = len(self.data.rows) if len(key) == 1 else n
            self._perm_cache[key] = np.random.default_rng([self.seed, *key]).permutation(size)
            if len(self._perm_cache) > 8:
                self._perm_cache.pop(next(iter(self._perm_cache)))
        return self._perm_cache[key]

    def locate(self, g: int) -> tuple[int, int]:
        """Global sequence number g -> (shard index, row in shard)."""
        epoch, k = divmod(int(g), self.data.total)
        shard_order = self._perm(epoch)
        sizes = np.asarray(self.data.rows)[shard_order]
        pos = int(np.searchsorted(np.cumsum(sizes), k, side="right"))
        shard = int(shard_order[pos])
        within = k - int(sizes[:pos].sum())
        return shard, int(self._perm(epoch, shard)[within])

    def global_indices(self, step: int) -> list[int]:
        """This rank's global sequence numbers for (0-based) optimizer step `step`, one per micro-batch."""
        base = step * self.sequences_per_step
        return [base + m * self.dp_world + self.dp_rank for m in range(self.grad_accum)]

    def step_batches(self, step: int) -> list[MicroBatch]:
        import torch

        out = []
        for g in self.global_indices(step):
            shard, row = self.locate(g)
            ids, pos, ntok = self.data.shard(shard)
            input_ids = torch.from_numpy(ids[row].astype(np.int64)).unsqueeze(0)
            position_ids = torch.from_numpy(pos[row].astype(np.int64)).unsqueeze(0)
            labels = packed_labels(input_ids, position_ids, int(ntok[row]))
            out.append(MicroBatch(int(self.data.offsets[shard]) + row, input_ids, position_ids, labels))
        return out

    def state_dict(self, next_step: int) -> dict[str, Any]:
        return {"next_step": int(next_step), "seed": self.seed, "dp_world": self.dp_world,
                "grad_accum": self.grad_accum, "total_sequences": self.data.total}

    def check_resume(self, state: dict[str, Any]) -> int:
        """The step to resume at; refuses a position that would mean something else with this data/layout."""
        for k in ("seed", "total_sequences"):
            if state.get(k) != (self.seed if k == "seed" else self.data.total):
                raise ValueError(f"checkpoint data position was taken with {k}={state.get(k)}, this run has "
                                 f"{self.seed if k == 'seed' else self.data.total}; cannot resume without "
                                 "skipping or repeating batches")
        if state["dp_world"] * state["grad_accum"] != self.sequences_per_step:
            raise ValueError("checkpoint was taken with another global batch; cannot resume the same data order")
        return int(state["next_step"])
