#!/usr/bin/env python
"""Rebuild the bundled sample's Parquet files and DATA_CARD.md's count tables from src/*.jsonl.

    python scripts/build_sample_data.py          # write fineweb2_de/*.parquet, malformed/, DATA_CARD counts
    python scripts/build_sample_data.py --check  # exit 1 if anything on disk differs from a fresh build

Deterministic: same sources, same files. Edit the JSONL sources, never the Parquet.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from definemed.data.sample import SAMPLE_MALFORMED, SAMPLE_WEB_DIR  # noqa: E402
from definemed.data.sample.build import (DATA_CARD, NUM_SHARDS, malformed_table, render_card,  # noqa: E402
                                         shard_name, web_shards, write_all)


def check() -> list[str]:
    import pyarrow.parquet as pq

    problems = []
    expected = {shard_name(i): t for i, t in enumerate(web_shards())}
    found = {p.name for p in SAMPLE_WEB_DIR.glob("*.parquet")} if SAMPLE_WEB_DIR.exists() else set()
    if found != set(expected):
        problems.append(f"{SAMPLE_WEB_DIR}: shards {sorted(found)} != {sorted(expected)}")
    for name, table in expected.items():
        p = SAMPLE_WEB_DIR / name
        if p.exists() and not pq.read_table(p).equals(table):
            problems.append(f"{p}: differs from the sources")
    if not SAMPLE_MALFORMED.exists() or not pq.read_table(SAMPLE_MALFORMED).equals(malformed_table()):
        problems.append(f"{SAMPLE_MALFORMED}: missing or stale")
    card = DATA_CARD.read_text(encoding="utf-8") if DATA_CARD.exists() else ""
    if not card or render_card(card) != card:
        problems.append(f"{DATA_CARD}: count tables missing or stale")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify instead of writing")
    args = ap.parse_args()
    if args.check:
        problems = check()
        for p in problems:
            print(p)
        print("sample data up to date" if not problems else "run scripts/build_sample_data.py")
        return 1 if problems else 0
    for p in write_all():
        print(f"wrote {p}")
    if DATA_CARD.exists():
        DATA_CARD.write_text(render_card(DATA_CARD.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"updated counts in {DATA_CARD}")
    else:
        print(f"{DATA_CARD} not found: counts not written", file=sys.stderr)
    print(f"{NUM_SHARDS} shards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
