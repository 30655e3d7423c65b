"""Build the bundled sample's Parquet files from src/*.jsonl, deterministically (scripts/build_sample_data.py).

Web documents become FineWeb2-schema shards; the crawl metadata FineWeb2 carries (dump, date, WARC path,
language score, MinHash cluster size) is synthesised from a hash of the text, so rebuilding gives identical
files. The malformed file stores `text` as BINARY (see MALFORMED_NOTE) so that one file can hold every defect.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from definemed.data.sample import (MMLU_SUBJECTS, PROMPT_CATEGORIES, SAMPLE_DIR, SAMPLE_MALFORMED, SAMPLE_MEDQA,
                                   SAMPLE_MMLU, SAMPLE_PROMPTS, SAMPLE_WEB_DIR, SAMPLE_WEB_SRC)
from definemed.data.schemas import GOLD_LABELS, MALFORMED_KINDS

SEED = 20240310
NUM_SHARDS = 4
OVERSIZED_CHARS = 200_000  # a document longer than this is "oversized" for the corpus ingest
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/definemed/sample")
_DUMPS = ("CC-MAIN-2023-50", "CC-MAIN-2024-10", "CC-MAIN-2024-18")
_DUMP_MONTH = {"CC-MAIN-2023-50": "2023-12", "CC-MAIN-2024-10": "2024-02", "CC-MAIN-2024-18": "2024-04"}
_SRC_KEYS = {"topic", "url", "text", "label", "rationale"}

MALFORMED_NOTE = (
    "`text` is typed BINARY in this file (Parquet cannot mix types in a column). Decode it as UTF-8: "
    "kind 'wrong_type' is a binary blob that is not UTF-8 text, 'ok' is a valid control row to keep.")


def shard_name(i: int, n: int = NUM_SHARDS) -> str:
    return f"train-{i:05d}-of-{n:05d}.parquet"


def doc_id(text: str) -> str:
    """FineWeb2-style id: a WARC record URN. uuid5 of the text makes it stable and unique per text."""
    return f"<urn:uuid:{uuid.uuid5(_NAMESPACE, text)}>"


def norm_text(text: str) -> str:
    """For near-duplicate checks: case and whitespace folded."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def web_schema():
    import pyarrow as pa

    return pa.schema([
        ("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
        ("date", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
        ("language_score", pa.float64()), ("language_script", pa.string()), ("minhash_cluster_size", pa.int64()),
        ("topic", pa.string()), ("gold_label", pa.string()), ("gold_rationale", pa.string()),
    ])


def read_web_src(files: tuple[Path, ...] = SAMPLE_WEB_SRC) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in files:
        for ln, line in enumerate(Path(f).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if set(row) != _SRC_KEYS:
                raise ValueError(f"{f}:{ln}: keys {sorted(row)} != {sorted(_SRC_KEYS)}")
            if row["label"] not in GOLD_LABELS:
                raise ValueError(f"{f}:{ln}: label {row['label']!r} not in {GOLD_LABELS}")
            rows.append(row)
    seen: dict[str, str] = {}
    for r in rows:
        k = norm_text(r["text"])
        if k in seen:
            raise ValueError(f"duplicate text (after case/whitespace folding): {r['url']} and {seen[k]}")
        seen[k] = r["url"]
    return rows


def _crawl_meta(text: str) -> dict[str, Any]:
    h = hashlib.sha256(text.encode("utf-8")).digest()
    dump = _DUMPS[h[0] % len(_DUMPS)]
    month = _DUMP_MONTH[dump]
    day, hour, minute, sec = 1 + h[1] % 28, h[2] % 24, h[3] % 60, h[4] % 60
    seg = 1700000000000 + int.from_bytes(h[5:9], "big") % 10_000_000_000
    stamp = f"{month.replace('-', '')}{day:02d}{hour:02d}{minute:02d}{sec:02d}"
    warc = int.from_bytes(h[9:11], "big") % 1000
    return {
        "dump": dump,
        "date": f"{month}-{day:02d}T{hour:02d}:{minute:02d}:{sec:02d}Z",
        "file_path": (f"s3://commoncrawl/crawl-data/{dump}/segments/{seg // 1000}.{seg % 1000 // 100}/warc/"
                      f"CC-MAIN-{stamp}-{stamp}-{warc:05d}.warc.gz"),
        "language": "deu",
        # GlotLID-like confidence for clean German text
        "language_score": round(0.93 + (int.from_bytes(h[11:13], "big") % 7000) / 100_000, 5),
        "language_script": "Latn",
        # most documents have no near-duplicates in the crawl; a few belong to small clusters
        "minhash_cluster_size": 1 + (h[13] % 16 == 0) * (1 + h[14] % 7) + (h[15] % 4 == 0),
    }


def web_records(rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """All web documents in FineWeb2 schema, shuffled with the fixed seed."""
    rows = read_web_src() if rows is None else rows
    recs = [{"text": r["text"], "id": doc_id(r["text"]), "url": r["url"], **_crawl_meta(r["text"]),
             "topic": r["topic"], "gold_label": r["label"], "gold_rationale": r["rationale"]} for r in rows]
    recs.sort(key=lambda r: r["id"])  # independent of source file order
    random.Random(SEED).shuffle(recs)
    cols = web_schema().names
    return [{c: r[c] for c in cols} for r in recs]


def web_shards(records: list[dict[str, Any]] | None = None, n: int = NUM_SHARDS) -> list[Any]:
    import pyarrow as pa

    records = web_records() if records is None else records
    size = -(-len(records) // n)
    return [pa.Table.from_pylist(records[i * size:(i + 1) * size], schema=web_schema()) for i in range(n)]


def _oversized_text() -> str:
    para = ("Dieser Absatz wiederholt sich, weil ein fehlerhafter Crawler eine endlose Seite gespeichert hat. "
            "Ein Dokument dieser Länge gehört nicht in das Trainingskorpus und muss in die Quarantäne. ")
    out, i = [], 0
    while sum(map(len, out)) <= OVERSIZED_CHARS + 10_000:
        out.append(f"[{i}] {para}")
        i += 1
    return "".join(out)


def malformed_records() -> list[dict[str, Any]]:
    ok = ("Die Hand-Fuß-Mund-Krankheit ist eine meist harmlose Virusinfektion, die vor allem Kinder unter zehn "
          "Jahren betrifft. Typisch sind Fieber, Bläschen im Mund sowie ein Ausschlag an Handflächen und "
          "Fußsohlen. Die Beschwerden klingen in der Regel nach sieben bis zehn Tagen ab. Wichtig sind "
          "ausreichendes Trinken und gründliches Händewaschen, um Ansteckungen in Kita und Familie zu vermeiden.")
    texts: dict[str, bytes | None] = {
        "empty": b"",
        "whitespace": " \n\t  \r\n\u00a0 \u3000 ".encode("utf-8"),
        "null": None,
        # a PNG header and bytes that are not valid UTF-8: an image stored where text belongs
        "wrong_type": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\xff\xfe\xfa\x80\x81",
        "oversized": _oversized_text().encode("utf-8"),
        "ok": ok.encode("utf-8"),
    }
    assert tuple(texts) == MALFORMED_KINDS
    recs = []
    for kind, raw in texts.items():
        key = f"malformed-{kind}"
        recs.append({
            "text": raw, "id": doc_id(key), "url": f"https://www.defekte-seite.example.de/{kind}",
            **_crawl_meta(key), "topic": "malformed" if kind != "ok" else "patient_information",
            "gold_label": "medical" if kind == "ok" else None,
            "gold_rationale": "Patienteninformation zu einer Infektionskrankheit." if kind == "ok" else None,
            "malformed_kind": kind,
        })
    return recs


def malformed_table():
    import pyarrow as pa

    schema = web_schema()
    schema = schema.set(schema.get_field_index("text"), pa.field("text", pa.binary()))
    schema = schema.append(pa.field("malformed_kind", pa.string()))
    schema = schema.with_metadata({"definemed.note": MALFORMED_NOTE})
    return pa.Table.from_pylist(malformed_records(), schema=schema)


def write_all(web_dir: Path = SAMPLE_WEB_DIR, malformed: Path = SAMPLE_MALFORMED) -> list[Path]:
    """Write the shards (whole directory swapped atomically) and the malformed file."""
    import pyarrow.parquet as pq

    from definemed.io import atomic_dir, write_parquet_atomic

    shards = web_shards()
    with atomic_dir(web_dir, overwrite=True) as tmp:
        for i, t in enumerate(shards):
            pq.write_table(t, tmp / shard_name(i, len(shards)))
    write_parquet_atomic(malformed_table(), malformed)
    return [web_dir / shard_name(i, len(shards)) for i in range(len(shards))] + [malformed]


# ----------------------------------------------------------------------------------------------------------------
# count tables for DATA_CARD.md

CARD_BEGIN, CARD_END = "<!-- counts:begin (generated by scripts/build_sample_data.py) -->", "<!-- counts:end -->"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def count_tables() -> str:
    """Markdown count tables of everything bundled, computed from the source files."""
    web = read_web_src()
    words = [len(r["text"].split()) for r in web]
    by_label = Counter(r["label"] for r in web)
    by_topic = Counter((r["label"], r["topic"]) for r in web)
    out = [f"**Web documents**: {len(web)} in {NUM_SHARDS} shards, {sum(words)} words "
           f"(per document {min(words)}-{max(words)}, median {sorted(words)[len(words) // 2]}).", "",
           _table(["gold_label", "documents", "share"],
                  [[lab, by_label[lab], f"{by_label[lab] / len(web):.1%}"] for lab in GOLD_LABELS]), "",
           _table(["gold_label", "topic", "documents"],
                  [[lab, top, n] for (lab, top), n in sorted(by_topic.items())]), ""]
    mal = malformed_records()
    out += [f"**Malformed rows** (`malformed/malformed.parquet`): {len(mal)}, one per kind: "
            + ", ".join(f"`{r['malformed_kind']}`" for r in mal) + ".", ""]
    mmlu = _jsonl(SAMPLE_MMLU)
    subj = Counter(r["subject"] for r in mmlu)
    keys = {s: Counter("ABCD"[r["answer"]] for r in mmlu if r["subject"] == s) for s in subj}
    order = [s for s in MMLU_SUBJECTS if s in subj] + sorted(set(subj) - set(MMLU_SUBJECTS))
    out += [f"**MMLU-de style items**: {len(mmlu)}.", "",
            _table(["subject", "items", "A", "B", "C", "D"],
                   [[s, subj[s]] + [keys[s][k] for k in "ABCD"] for s in order]
                   + [["**total**", len(mmlu)] + [sum(keys[s][k] for s in subj) for k in "ABCD"]]), ""]
    medqa = _jsonl(SAMPLE_MEDQA)
    meta = Counter(r.get("meta_info", "") for r in medqa)
    ans = Counter(r["answer_idx"] for r in medqa)
    out += [f"**MedQA-de style items**: {len(medqa)}.", "",
            _table(["meta_info", "items"], [[m, n] for m, n in sorted(meta.items())]), "",
            _table(["answer_idx", "A", "B", "C", "D", "E"], [["items"] + [ans[k] for k in "ABCDE"]]), ""]
    prompts = _jsonl(SAMPLE_PROMPTS)
    cat = Counter(r["category"] for r in prompts)
    order = [c for c in PROMPT_CATEGORIES if c in cat] + sorted(set(cat) - set(PROMPT_CATEGORIES))
    out += [f"**Clinical prompts**: {len(prompts)}.", "",
            _table(["category", "prompts"], [[c, cat[c]] for c in order])]
    return "\n".join(out)


def render_card(card_text: str) -> str:
    """card_text with the generated block between the markers replaced."""
    if CARD_BEGIN not in card_text or CARD_END not in card_text:
        raise ValueError("DATA_CARD.md lacks the counts markers")
    head, rest = card_text.split(CARD_BEGIN, 1)
    _, tail = rest.split(CARD_END, 1)
    return f"{head}{CARD_BEGIN}\n{count_tables()}\n{CARD_END}{tail}"


DATA_CARD = SAMPLE_DIR.parents[2] / "DATA_CARD.md"
