"""The bundled sample: German web documents (FineWeb2 schema), MC benchmarks and clinical prompts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

SAMPLE_DIR = Path(__file__).resolve().parent
SRC_DIR = SAMPLE_DIR / "src"


def iter_tokenizer_texts() -> Iterator[str]:
    """All bundled German text, in a fixed order, for training the tiny models' tokenizers."""
    for f in sorted(SRC_DIR.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("text", "question", "prompt"):
                if isinstance(row.get(key), str):
                    yield row[key]
            for c in row.get("choices") or []:
                yield str(c)
            for c in (row.get("options") or {}).values():
                yield str(c)
