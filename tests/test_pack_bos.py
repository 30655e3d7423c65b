"""Every packed chunk of a document opens with <bos> when the tokenizer adds one (Gemma, Mistral, Llama).

A model that always saw <bos> first in pre-training starts a row without it from a much higher loss (gemma-3-270m:
about 4.2 instead of 3.2), so chunks after a long document's first must get their own <bos>.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from definemed.train.pack import build_rows, chunk_document


def test_every_chunk_starts_with_bos_and_no_token_is_lost():
    bos = 1
    doc = [bos] + list(range(10, 35)) + [2]  # 27 tokens: <bos> ... <eos>
    chunks = chunk_document(doc, 8, bos_id=bos)
    assert all(c[0] == bos for c in chunks)
    assert all(len(c) <= 8 for c in chunks)
    # dropping the added <bos> of every later chunk gives the document back
    assert chunks[0] + [t for c in chunks[1:] for t in c[1:]] == doc


def test_without_bos_chunking_is_unchanged():
    doc = list(range(10, 37))
    assert chunk_document(doc, 8) == [doc[i:i + 8] for i in range(0, 27, 8)]
    # a tokenizer that adds no <bos> (Qwen) leaves documents alone even if a bos id is passed
    assert chunk_document(doc, 8, bos_id=1) == [doc[i:i + 8] for i in range(0, 27, 8)]


def test_build_rows_keeps_bos_at_every_document_start():
    bos = 1
    docs = [[bos] + list(range(100, 130)) + [2], [bos, 5, 6, 2]]
    cols = build_rows(docs, seq_len=16, pad_id=0, bos_id=bos)
    for ids, pos in zip(cols["input_ids"], cols["position_ids"]):
        starts = [i for i, p in enumerate(pos) if p == 0]
        n = cols["num_tokens"][cols["input_ids"].index(ids)]
        assert all(ids[i] == bos for i in starts if i < n)


def test_pack_local_opens_every_chunk_with_bos(tiny_mistral, tmp_path):
    """End to end through the tokenizer: tiny Mistral adds <s>, and long documents are split."""
    from definemed.train.pack import SHARDS_DIR, load_tokenizer, pack_local

    tok = load_tokenizer(tiny_mistral)
    text = " ".join(["Der Patient klagt über Brustschmerzen und Atemnot seit drei Tagen."] * 30)
    table = pa.table({"text": [text, "Kurzer Befund ohne Auffälligkeiten."]})
    out = pack_local(table, tiny_mistral, tmp_path / "packed", seq_len=64)
    rows = pq.read_table(out / SHARDS_DIR).to_pylist()
    starts = 0
    for r in rows:
        off = 0
        for n in r["doc_lens"]:
            assert r["input_ids"][off] == tok.bos_token_id
            off += n
            starts += 1
    assert starts > 2  # the long document was split, so later chunks were checked too
