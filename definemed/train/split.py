"""Seeded train / held-out split of FineMed-de by a hash of the document id, decided before `pack`.

A document's side depends only on (seed, id): the same document lands on the same side in every run, on every
machine and whatever the shard order, and adding documents never moves old ones. The held-out side is what the
eval stage measures medical perplexity on: text of the training distribution that CPT never saw.
"""
from __future__ import annotations

import hashlib

from pydantic import Field

from definemed.config import StrictModel

HELDOUT_FILE = "heldout.parquet"
SPLIT_FILE = "split.json"


class HeldoutConfig(StrictModel):
    fraction: float = Field(0.15, gt=0, lt=1, description="share of documents held out from training")
    seed: int = 0
    id_column: str = "id"


def is_heldout(doc_id: str, fraction: float, seed: int) -> bool:
    """True for about `fraction` of ids, chosen by sha256(seed:id) (uniform, stable, independent of order)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def heldout_mask(ids, fraction: float, seed: int) -> list[bool]:
    return [is_heldout(str(i), fraction, seed) for i in ids]


def _dev_test_unit(seed: int, doc_id: str) -> float:
    # salted: the held-out rule above is sha256(f"{seed}:{id}") < fraction, so the same unsalted hash would put every
    # held-out document on one side. The salt keeps its first user's name so earlier merge searches reproduce.
    h = hashlib.sha256(f"merge-search:{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def dev_test_split(docs: list[tuple[str, str]], seed: int, split: str, n: int | None = None) -> list[tuple[str, str]]:
    """The dev or the test half of (id, text) documents by a seeded id hash: whatever selects (a merge search, a
    distillation sweep) picks on dev, and its result is reported on test. The first n of a split in hash order (a
    larger n keeps the smaller one's documents)."""
    keyed = sorted(((_dev_test_unit(seed, i), i, t) for i, t in docs), key=lambda r: r[0])
    mine = [(i, t) for u, i, t in keyed if (u < 0.5) == (split == "dev")]
    return mine if n is None else mine[:n]


def write_heldout(files: list[str], fs, text_column: str, cfg: HeldoutConfig, out_dir) -> dict:
    """Stream the input once and write its held-out documents (id + text) to `out_dir/heldout.parquet`
    atomically; return the split record for split.json and the lineage."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from pathlib import Path

    from definemed.data.loaders import arrow_paths
    from definemed.io import _atomic_target

    paths, filesystem = arrow_paths(files, fs)
    data = pads.dataset(paths, format="parquet", filesystem=filesystem)
    if cfg.id_column not in data.schema.names:
        from definemed.config import ConfigError

        raise ConfigError(f"invalid config field 'heldout.id_column': column '{cfg.id_column}' not in {files[0]} "
                          f"(columns: {', '.join(data.schema.names)})")
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    total, ids = 0, []
    target = Path(out_dir) / HELDOUT_FILE
    with _atomic_target(target) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in data.to_batches(columns=[cfg.id_column, text_column]):
                bid = [str(x) for x in batch.column(0).to_pylist()]
                text = batch.column(1).to_pylist()
                total += len(bid)
                keep = [i for i, flag in enumerate(heldout_mask(bid, cfg.fraction, cfg.seed)) if flag]
                if keep:
                    ids += [bid[i] for i in keep]
                    writer.write_table(pa.table({"id": [bid[i] for i in keep], "text": [text[i] for i in keep]},
                                                schema=schema))
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
    return {"rule": "sha256(f'{seed}:{id}')[:8] / 2**64 < fraction", "fraction": cfg.fraction, "seed": cfg.seed,
            "id_column": cfg.id_column, "input_docs": total, "heldout_docs": len(ids),
            "train_docs": total - len(ids), "heldout_ids_sha256": digest, "heldout_ids": sorted(ids),
            "heldout_file": str(target)}


def trained_ids(pack_dir) -> set[str]:
    """Ids of the documents a pack run trained on (its input minus its held-out side)."""
    import json
    from pathlib import Path

    import pyarrow.dataset as pads

    from definemed.data.loaders import arrow_paths, parquet_files

    rec = json.loads((Path(pack_dir) / SPLIT_FILE).read_text(encoding="utf-8"))
    files, fs = parquet_files(rec["input"])
    paths, filesystem = arrow_paths(files, fs)
    ids = pads.dataset(paths, format="parquet", filesystem=filesystem).to_table(
        columns=[rec["id_column"]]).column(0).to_pylist()
    return {str(i) for i in ids if not is_heldout(str(i), rec["fraction"], rec["seed"])}
