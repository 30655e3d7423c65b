"""Fuzzy deduplication: MinHash LSH on Ray Data (the FineWeb/datatrove recipe).

1. Signatures: word 5-gram shingles (`definemed.text.words`, lower-cased), 112 permutations with 64-bit hashes.
   Shingles are hashed to 64 bits in numpy (xxh64 per distinct word, folded over 5 words); the permutations and
   minima come from `datasketch` (scheme "affine64": a 64-bit bijective affine permutation per hash function),
   the well-kept MinHash library, whose `update_batch` is vectorised over a document's shingles. datasketch
   rather than our own numpy permutations: its schemes are documented and tested for estimator bias, and its
   `gpu_mode` can move the permutations onto a GPU.
2. Banding: 14 bands x 8 rows (about 0.72 Jaccard threshold). Each band's 8 values fold into one 64-bit bucket
   key (seeded by the band index, so equal values in different bands never share a bucket).
3. Buckets: a Ray Data groupby on the bucket key, executed as the hash-partitioned shuffle that Ray's groupby
   uses (`repartition(keys=...)`, every key in exactly one block) followed by ONE vectorised call per block that
   emits an edge from every bucket member to the bucket's smallest member. Ray's `groupby().map_groups()` /
   `aggregate()` would call Python once per group (millions of buckets).
4. Clusters: connected components of the edges (scipy) on the driver, which holds only documents that have a
   near-duplicate, never the corpus. The smallest (id, content_hash) of each cluster is kept; the rest are
   removed, so the result does not depend on partitioning or arrival order.

Documents are keyed by `content_hash` (unique after exact dedup, even where a source repeats an id).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from definemed.text import words

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio odd constant: multiply-xorshift fold of a band's values


@dataclass(frozen=True)
class MinHashParams:
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def threshold(self) -> float:
        """Jaccard where a pair becomes a candidate with probability ~1/2: (1/b)^(1/r)."""
        return (1 / self.bands) ** (1 / self.rows)

    def candidate_probability(self, jaccard: float) -> float:
        return 1 - (1 - jaccard ** self.rows) ** self.bands


def shingles(text: str, n: int) -> list[bytes]:
    """Word n-grams as bytes (reference form; `shingle_hashes` hashes the same n-grams without building them).
    A document shorter than n words is one shingle (all its words)."""
    w = [x.lower() for x in words(text)]
    if len(w) < n:
        return [" ".join(w).encode("utf-8")] if w else []
    return list({" ".join(w[i:i + n]).encode("utf-8") for i in range(len(w) - n + 1)})


def shingle_hashes(text: str, n: int, cache: dict[str, int]) -> np.ndarray:
    """64-bit hashes of the document's word n-grams: xxh64 of each distinct word (cached per batch), folded over
    n consecutive words in numpy. Building and hashing every n-gram string in Python cost ~3x more."""
    import xxhash

    w = [x.lower() for x in words(text)]
    if not w:
        return np.empty(0, dtype=np.uint64)
    wh = np.fromiter((cache[x] if x in cache else cache.setdefault(x, xxhash.xxh64_intdigest(x.encode("utf-8"))) for x in w),
                     dtype=np.uint64, count=len(w))
    m = max(1, len(w) - n + 1)
    with np.errstate(over="ignore"):
        h = wh[:m].copy()
        for k in range(1, min(n, len(w))):
            h = (h * _MIX) ^ wh[k:k + m]
        h ^= h >> np.uint64(31)
    return np.unique(h)


def _identity(x):
    return x


_TEMPLATES: dict[MinHashParams, Any] = {}


def signatures(texts: Iterable[str], p: MinHashParams) -> tuple[np.ndarray, np.ndarray]:
    """(n x num_perm uint64 signatures, mask of documents that have at least one word)."""
    from datasketch import MinHash

    template = _TEMPLATES.get(p)
    if template is None:  # permutation parameters drawn once per process; inputs are already 64-bit hashes
        template = _TEMPLATES[p] = MinHash(num_perm=p.num_perm, seed=p.seed, scheme="affine64", hashfunc=_identity)
    rows, ok, cache = [], [], {}
    for t in texts:
        hv = shingle_hashes(t, p.ngram, cache)
        ok.append(len(hv) > 0)
        m = template.copy()
        if len(hv):
            m.update_batch(hv)
        rows.append(m.hashvalues)
    sig = np.asarray(rows, dtype=np.uint64).reshape(len(rows), p.num_perm)
    return sig, np.asarray(ok, dtype=bool)


def band_keys(sig: np.ndarray, p: MinHashParams) -> np.ndarray:
    """n x bands uint64 bucket keys: each band's `rows` values folded with a multiply-xorshift mix."""
    n = sig.shape[0]
    bands = sig.reshape(n, p.bands, p.rows)
    with np.errstate(over="ignore"):  # modulo 2^64 arithmetic is the point
        h = np.broadcast_to((np.arange(p.bands, dtype=np.uint64) + np.uint64(1)) * _MIX, (n, p.bands)).copy()
        for r in range(p.rows):
            h ^= bands[:, :, r]
            h *= _MIX
            h ^= h >> np.uint64(29)
    return h


def bucket_rows(batch: "pa.Table", params: MinHashParams) -> "pa.Table":
    """map_batches step: (id, content_hash, text) -> one row per (document, band): bucket, id, doc."""
    import pyarrow as pa

    sig, ok = signatures(batch.column("text").to_pylist(), params)
    keys = band_keys(sig, params)[ok]
    ids = np.asarray(batch.column("id").to_pylist(), dtype=object)[ok]
    docs = np.asarray(batch.column("content_hash").to_pylist(), dtype=object)[ok]
    return pa.table({"bucket": pa.array(keys.reshape(-1), type=pa.uint64()),
                     "id": pa.array(np.repeat(ids, params.bands), type=pa.string()),
                     "doc": pa.array(np.repeat(docs, params.bands), type=pa.string())})


def bucket_edges(block: "pa.Table") -> "pa.Table":
    """One call per hash partition: for every bucket with more than one document, an edge from each member to
    the bucket's smallest (id, doc). Vectorised: a sort and a few array operations, no loop over buckets."""
    import pyarrow as pa

    empty = pa.table({"a_id": pa.array([], pa.string()), "a_doc": pa.array([], pa.string()),
                      "b_id": pa.array([], pa.string()), "b_doc": pa.array([], pa.string())})
    if block.num_rows < 2:
        return empty
    t = block.sort_by([("bucket", "ascending"), ("id", "ascending"), ("doc", "ascending")])
    b = t.column("bucket").to_numpy()
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    sizes = np.diff(np.r_[starts, len(b)])
    head = np.repeat(starts, sizes)  # index of each row's bucket head
    member = np.arange(len(b)) != head
    if not member.any():
        return empty
    ids, docs = t.column("id"), t.column("doc")
    keep_a, keep_b = pa.array(head[member]), pa.array(np.flatnonzero(member))
    return pa.table({"a_id": ids.take(keep_a), "a_doc": docs.take(keep_a),
                     "b_id": ids.take(keep_b), "b_doc": docs.take(keep_b)})


def clusters(edges: Iterable["pa.Table"]) -> tuple[set[str], dict[str, int]]:
    """Connected components of the edges -> (doc keys to remove, stats). Keeps the smallest (id, doc)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index: dict[tuple[str, str], int] = {}
    a_idx: list[np.ndarray] = []
    b_idx: list[np.ndarray] = []
    for e in edges:
        if e.num_rows == 0:
            continue
        for side, out in (("a", a_idx), ("b", b_idx)):
            nodes = zip(e.column(f"{side}_id").to_pylist(), e.column(f"{side}_doc").to_pylist())
            out.append(np.fromiter((index.setdefault(n, len(index)) for n in nodes), dtype=np.int64,
                                   count=e.num_rows))
    if not index:
        return set(), {"clusters": 0, "docs_in_clusters": 0, "removed": 0}
    a, b = np.concatenate(a_idx), np.concatenate(b_idx)
    n = len(index)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    n_comp, label = connected_components(graph, directed=False)
    nodes = sorted(index, key=index.__getitem__)  # position == node index
    order = sorted(range(n), key=lambda i: nodes[i])  # by (id, doc): the first of each component is kept
    keep = {}
    for i in order:
        keep.setdefault(int(label[i]), i)
    kept = set(keep.values())
    removed = {nodes[i][1] for i in range(n) if i not in kept}
    return removed, {"clusters": int(n_comp), "docs_in_clusters": n, "removed": len(removed)}


def find_duplicates_local(table: "pa.Table", params: MinHashParams = MinHashParams()) -> tuple[set[str], dict]:
    """The same steps in this process (tests, small corpora): all buckets form one partition."""
    return clusters([bucket_edges(bucket_rows(table, params))])


def find_duplicates(ds: "ray.data.Dataset", params: MinHashParams, partitions: int,
                    batch_size: int = 256) -> tuple[set[str], dict[str, int]]:
    """ds: id, content_hash, text. Streams signatures through a hash shuffle; only edges reach the driver."""
    rows = ds.select_columns(["id", "content_hash", "text"]).map_batches(
        bucket_rows, batch_format="pyarrow", batch_size=batch_size, fn_kwargs={"params": params})
    edges = rows.repartition(partitions, keys=["bucket"]).map_batches(bucket_edges, batch_format="pyarrow",
                                                                       batch_size=None)
    return clusters(edges.iter_batches(batch_format="pyarrow", batch_size=None))
