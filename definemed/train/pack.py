"""`pack` stage: tokenize a text corpus with the base model's fast tokenizer and bin-pack it into constant-length
sequences (best-fit-decreasing), written as Parquet shards.

Steps (each a plain function, testable alone): tokenize (Ray Data, batched, EOS after every document)
-> chunk (documents longer than seq_len are split first) -> best_fit_decreasing -> build_rows -> write.

A packed row holds `input_ids` and `position_ids` (restarting at 0 for every document, so transformers masks
attention per document), `doc_lens` (the per-sequence document boundaries; padding is what follows their sum)
and `num_tokens`. The padding fraction is reported beside what naive one-document-per-row padding would waste.
"""
from __future__ import annotations

import bisect
import functools
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import Field

from definemed.config import InputPath, StageConfig
from definemed.corpus.malformed import malformed_reason
from definemed.data.loaders import arrow_paths, parquet_files
from definemed.models.registry import ModelRef
from definemed.train.split import HeldoutConfig

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
STATS_FILE = "stats.json"
QUARANTINE_FILE = "quarantine.parquet"


class PackConfig(StageConfig):
    input: InputPath  # Parquet file, directory or glob (the filter stage's FineMed-de output)
    text_column: str = "text"
    model: ModelRef  # whose tokenizer: tiny://qwen2, real://gemma-3-270m, /models/Qwen2.5-7B-Instruct, ...
    seq_len: int = Field(4096, ge=8)
    tokenize_batch_size: int = Field(256, ge=1)
    # BFD runs per group of documents: bounded memory, parallel over Ray Data tasks; large groups pad less.
    pack_group_docs: int = Field(20_000, ge=1)
    sequences_per_shard: int = Field(4096, ge=1)
    min_doc_tokens: int = Field(2, ge=1)  # a 1-token document has no next token to predict
    # Document separator; None = the tokenizer's eos_token. Qwen2.5 *Instruct* has eos <|im_end|> (end of turn);
    # its pre-training separator is <|endoftext|>, which a CPT run may prefer.
    eos_token: str | None = None
    limit_docs: int | None = Field(None, ge=1)
    # Held-out documents (chosen by a seeded hash of the id) are written to heldout.parquet and never packed:
    # the eval stage's medical perplexity set. None packs everything.
    heldout: HeldoutConfig | None = None


# ----------------------------------------------------------------------------------------------------------------
# pure steps


def chunk_document(tokens: Sequence[int], seq_len: int, bos_id: int | None = None) -> list[list[int]]:
    """Split a tokenized document into pieces of at most seq_len tokens (the last piece keeps the EOS).

    When the document opens with `bos_id` (a tokenizer that adds <bos>), every later piece opens with it too:
    such models never saw a sequence start without it, and start from a much higher loss when it is missing.
    """
    if bos_id is None or not tokens or tokens[0] != bos_id or len(tokens) <= seq_len:
        return [list(tokens[i:i + seq_len]) for i in range(0, len(tokens), seq_len)]
    chunks = [list(tokens[:seq_len])]
    body = seq_len - 1  # later pieces: <bos> + seq_len - 1 tokens of the document
    chunks += [[bos_id, *tokens[i:i + body]] for i in range(seq_len, len(tokens), body)]
    return chunks


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items by decreasing length, each into the open bin it fills most tightly.

    Deterministic (ties broken by index). Open bins live in a sorted list keyed by remaining space, so each item
    is one bisect; bins are dropped once no remaining item can fit them.
    """
    if any(n > capacity or n <= 0 for n in lengths):
        bad = next(n for n in lengths if n > capacity or n <= 0)
        raise ValueError(f"item of length {bad} does not fit capacity {capacity}; chunk documents first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    open_keys: list[tuple[int, int]] = []  # (remaining, bin id), sorted
    for pos, i in enumerate(order):
        n = lengths[i]
        j = bisect.bisect_left(open_keys, (n, -1))
        if j < len(open_keys):
            remaining, b = open_keys.pop(j)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        remaining -= n
        smallest_left = lengths[order[-1]]
        if remaining >= smallest_left and pos + 1 < len(order):
            bisect.insort(open_keys, (remaining, b))
    return bins


def build_rows(docs: Sequence[Sequence[int]], seq_len: int, pad_id: int,
               shuffle_seed: int | None = None, bos_id: int | None = None) -> dict[str, list]:
    """Chunk, pack and lay out documents as constant-length rows (columns of a packed shard).

    BFD emits bins from the longest documents to the shortest; `shuffle_seed` shuffles the rows so that a shard
    cut from the output is not all long (or all short) documents.
    """
    import random

    chunks = [c for d in docs for c in chunk_document(d, seq_len, bos_id)]
    bins = best_fit_decreasing([len(c) for c in chunks], seq_len)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(bins)
    cols: dict[str, list] = {"input_ids": [], "position_ids": [], "doc_lens": [], "num_tokens": []}
    for b in bins:
        ids: list[int] = []
        pos: list[int] = []
        lens: list[int] = []
        for i in b:
            ids.extend(chunks[i])
            pos.extend(range(len(chunks[i])))
            lens.append(len(chunks[i]))
        n = len(ids)
        pad = seq_len - n
        ids.extend([pad_id] * pad)
        pos.extend(range(pad))  # padding restarts positions too: no real token attends to it (it comes last)
        cols["input_ids"].append(ids)
        cols["position_ids"].append(pos)
        cols["doc_lens"].append(lens)
        cols["num_tokens"].append(n)
    return cols


def padding_stats(doc_lens: Iterable[Sequence[int]], seq_len: int) -> dict[str, Any]:
    """Padding of the packed rows vs naive one-document(-chunk)-per-row padding of the same chunks."""
    n_seq = n_chunks = n_tok = 0
    for lens in doc_lens:
        n_seq += 1
        n_chunks += len(lens)
        n_tok += int(sum(lens))
    packed_slots, naive_slots = n_seq * seq_len, n_chunks * seq_len
    return {
        "sequences": n_seq,
        "chunks": n_chunks,
        "tokens": n_tok,
        "padding_fraction": (1 - n_tok / packed_slots) if packed_slots else 0.0,
        "naive_padding_fraction": (1 - n_tok / naive_slots) if naive_slots else 0.0,
        "naive_sequences": n_chunks,
    }


# ----------------------------------------------------------------------------------------------------------------
# Ray Data steps


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"{path}: a fast tokenizer is required for batched packing")
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: tokenizer has no eos_token; documents must end with EOS")
    return tok


def same_vocabulary(path_a: str, path_b: str) -> bool:
    """Whether two models' tokenizers map the same strings to the same ids (token ids made by one mean the same
    to the other). A tokenizer that cannot be read counts as different."""
    if Path(path_a).resolve() == Path(path_b).resolve():
        return True
    try:
        return load_tokenizer(path_a).get_vocab() == load_tokenizer(path_b).get_vocab()
    except (OSError, ValueError):
        return False


def leading_bos_id(tok) -> int | None:
    """The <bos> id when this tokenizer opens every text with it (Gemma, Mistral, Llama), else None (Qwen)."""
    if tok.bos_token_id is None:
        return None
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return tok.bos_token_id if ids and ids[0] == tok.bos_token_id else None


def separator_id(tok, eos_token: str | None) -> int:
    if eos_token is None:
        return tok.eos_token_id
    tid = tok.get_vocab().get(eos_token)
    if tid is None:
        from definemed.config import ConfigError

        raise ConfigError(f"invalid config field 'eos_token': '{eos_token}' is not a token of this tokenizer")
    return int(tid)


def tokenize_batch(batch, tokenizer_path: str, text_column: str, min_doc_tokens: int, eos_id: int | None = None):
    """Tokenize a batch of documents (the model's own special tokens, e.g. Mistral's BOS) and end each with EOS.
    Unusable rows are dropped here; the quarantine pass records them."""
    import pyarrow as pa

    tok = load_tokenizer(tokenizer_path)
    eos = tok.eos_token_id if eos_id is None else eos_id
    texts = [t for t in batch.column(text_column).to_pylist() if malformed_reason(t) is None]
    out: list[list[int]] = []
    if texts:
        for ids in tok(texts, add_special_tokens=True)["input_ids"]:
            if not ids or ids[-1] != eos:
                ids = list(ids) + [eos]
            if len(ids) >= min_doc_tokens:
                out.append(ids)
    return pa.table({"tokens": pa.array(out, type=pa.list_(pa.int32()))})


def drop_heldout(batch, cfg: HeldoutConfig, text_column: str):
    """Keep the training side of the split (the text column only)."""
    import pyarrow as pa

    from definemed.train.split import heldout_mask

    held = heldout_mask(batch.column(cfg.id_column).to_pylist(), cfg.fraction, cfg.seed)
    return batch.select([text_column]).filter(pa.array([not h for h in held]))


def pack_batch(batch, seq_len: int, pad_id: int, bos_id: int | None = None):
    import pyarrow as pa

    docs = batch.column("tokens").to_pylist()
    # Seeded by the group's content, so the same input always gives the same shards.
    seed = zlib.crc32(json.dumps([len(docs), docs[0][:16] if docs else []]).encode())
    cols = build_rows(docs, seq_len, pad_id, shuffle_seed=seed, bos_id=bos_id)
    ints = pa.list_(pa.int32())
    return pa.table({
        "input_ids": pa.array(cols["input_ids"], type=ints),
        "position_ids": pa.array(cols["position_ids"], type=ints),
        "doc_lens": pa.array(cols["doc_lens"], type=ints),
        "num_tokens": pa.array(cols["num_tokens"], type=pa.int32()),
    })


def check_text_column(files: list[str], fs: Any, column: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from definemed.config import ConfigError

    if fs is None:
        schema = pq.read_schema(files[0])
    else:
        from definemed.data.loaders import fs_path

        with fs.open(fs_path(files[0], fs), "rb") as fh:
            schema = pq.read_schema(fh)
    if column not in schema.names:
        raise ConfigError(f"invalid config field 'text_column': column '{column}' not in {files[0]} "
                          f"(columns: {', '.join(schema.names)})")
    if not (pa.types.is_string(schema.field(column).type) or pa.types.is_large_string(schema.field(column).type)):
        raise ConfigError(f"invalid config field 'text_column': column '{column}' in {files[0]} is "
                          f"{schema.field(column).type}, not a string column")


def write_quarantine(files: list[str], fs: Any, column: str, out: Path) -> int:
    """Malformed rows (`corpus.malformed.malformed_reason`) go to quarantine.parquet, whole, with a `reason` column (nothing is
    lost silently). A scan of the text column in Arrow batches; only bad rows reach memory."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from definemed.io import write_parquet_atomic

    paths, filesystem = arrow_paths(files, fs)
    data = pads.dataset(paths, format="parquet", filesystem=filesystem)
    bad, reasons = [], []
    for batch in data.to_batches():
        r = [malformed_reason(t) for t in batch.column(column).to_pylist()]
        mask = pa.array([x is not None for x in r])
        if mask.true_count:
            bad.append(pa.Table.from_batches([batch]).filter(mask))
            reasons += [x for x in r if x is not None]
    if not bad:
        return 0
    table = pa.concat_tables(bad)
    write_parquet_atomic(table.append_column("reason", pa.array(reasons, type=pa.string())), out / QUARANTINE_FILE)
    return table.num_rows


def write_shards(cfg: PackConfig, files: list[str], fs: Any, shards: Path, tok_path: str, *, eos_id: int,
                 pad_id: int, bos_id: int | None) -> None:
    """read -> (drop held-out) -> tokenize -> pack -> Parquet shards part-NNNNN, written all-or-nothing."""
    import ray

    from definemed.io import atomic_dir

    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # same input -> same groups -> same packing, every run
    try:
        paths, arrow_fs = arrow_paths(files, fs)
        cols = [cfg.text_column] + ([cfg.heldout.id_column] if cfg.heldout else [])
        ds = ray.data.read_parquet(paths, filesystem=arrow_fs).select_columns(cols)
        if cfg.limit_docs:
            ds = ds.limit(cfg.limit_docs)
        if cfg.heldout:
            ds = ds.map_batches(drop_heldout, batch_format="pyarrow",
                                fn_kwargs=dict(cfg=cfg.heldout, text_column=cfg.text_column))
        ds = ds.map_batches(tokenize_batch, batch_size=cfg.tokenize_batch_size, batch_format="pyarrow",
                            fn_kwargs=dict(tokenizer_path=tok_path, text_column=cfg.text_column,
                                           min_doc_tokens=cfg.min_doc_tokens, eos_id=eos_id))
        ds = ds.map_batches(pack_batch, batch_size=cfg.pack_group_docs, batch_format="pyarrow",
                            fn_kwargs=dict(seq_len=cfg.seq_len, pad_id=pad_id, bos_id=bos_id))
        with atomic_dir(shards) as tmp:
            ds.write_parquet(str(tmp), max_rows_per_file=cfg.sequences_per_shard)
            # Ray names files by write task; the stable part-NNNNN order is the dataloader's shard order.
            for i, f in enumerate(sorted(tmp.glob("*.parquet"))):
                os.replace(f, tmp / f"part-{i:05d}.parquet")
    finally:
        ctx.execution_options.preserve_order = old_order


def run(cfg: PackConfig) -> dict[str, str]:
    import pyarrow.parquet as pq

    from definemed.io import atomic_write_json
    from definemed.models import resolve_model

    out = Path(cfg.output_dir)
    shards = out / SHARDS_DIR
    tok_path = resolve_model(cfg.model)
    tok = load_tokenizer(tok_path)  # fail here, on the driver, with a clear message
    eos_id = separator_id(tok, cfg.eos_token)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    bos_id = leading_bos_id(tok)

    files, fs = parquet_files(cfg.input)
    check_text_column(files, fs, cfg.text_column)
    split = None
    if cfg.heldout is not None:
        from definemed.train.split import SPLIT_FILE, write_heldout

        split = {"input": cfg.input, **write_heldout(files, fs, cfg.text_column, cfg.heldout, out)}
        atomic_write_json(out / SPLIT_FILE, split)

    if not shards.exists():  # all-or-nothing: a killed pack leaves only a temp dir, which is redone
        write_shards(cfg, files, fs, shards, tok_path, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id)
    n_bad = write_quarantine(files, fs, cfg.text_column, out)

    files = sorted(shards.glob("*.parquet"))
    doc_lens = (lens for f in files for lens in pq.read_table(f, columns=["doc_lens"]).column("doc_lens").to_pylist())
    stats = padding_stats(doc_lens, cfg.seq_len)
    if split is not None:
        stats["split"] = {k: v for k, v in split.items() if k != "heldout_ids"}
    stats.update(seq_len=cfg.seq_len, shards=len(files), quarantined_rows=n_bad, tokenizer=tok_path,
                 eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=bos_id, model=cfg.model,
                 format="input_ids,position_ids (restart per document),doc_lens,num_tokens")
    atomic_write_json(out / STATS_FILE, stats)
    log.info("[pack] %d sequences of %d tokens from %d chunks: padding %.3f%% (naive one-doc-per-row: %.1f%%)",
             stats["sequences"], cfg.seq_len, stats["chunks"], 100 * stats["padding_fraction"],
             100 * stats["naive_padding_fraction"])
    print(f"[pack] padding {100 * stats['padding_fraction']:.3f}% of {stats['sequences']} packed sequences vs "
          f"{100 * stats['naive_padding_fraction']:.1f}% for naive one-document-per-row "
          f"({stats['naive_sequences']} rows); {n_bad} rows quarantined", flush=True)
    outputs = {"shards": str(shards), "stats": str(out / STATS_FILE)}
    if split is not None:
        outputs.update(heldout=split["heldout_file"], split=str(out / "split.json"))
    if n_bad:
        outputs["quarantine"] = str(out / QUARANTINE_FILE)
    return outputs


def pack_local(table, model: str, out_dir: str | os.PathLike, seq_len: int, text_column: str = "text",
               min_doc_tokens: int = 2) -> Path:
    """The stage's steps in this process, for small corpora (benchmarks, tests): one shard + stats.json in the
    stage's layout. Large corpora go through `run` (Ray Data)."""
    import pyarrow.parquet as pq

    from definemed.io import atomic_dir, atomic_write_json
    from definemed.models import resolve_model

    path = resolve_model(model)
    tok = load_tokenizer(path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bos_id = leading_bos_id(tok)
    packed = pack_batch(tokenize_batch(table, path, text_column, min_doc_tokens), seq_len, pad_id, bos_id)
    out = Path(out_dir)
    with atomic_dir(out / SHARDS_DIR) as tmp:
        pq.write_table(packed, tmp / "part-00000.parquet")
    stats = padding_stats(packed.column("doc_lens").to_pylist(), seq_len)
    stats.update(seq_len=seq_len, shards=1, quarantined_rows=0, tokenizer=path, eos_token_id=tok.eos_token_id,
                 pad_token_id=pad_id, bos_token_id=bos_id, model=model)
    atomic_write_json(out / STATS_FILE, stats)
    return out


def read_stats(packed_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(packed_dir) / STATS_FILE).read_text(encoding="utf-8"))
