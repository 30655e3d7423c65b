"""The filter's reference run: the bundled sample plus planted rows, and a summary of what the filter wrote.

`tests/data/filter_reference.json` holds the summary of the filter as it was before it became a streaming
pipeline (two materialised passes, pandas dedup). The streaming filter must reproduce it.
The tiny random classifier scores every document near 0.5018; THRESHOLD sits in a gap of ~1.8e-6 between two
scores, far above batching noise (~6e-8), so the kept set does not depend on batch layout.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

THRESHOLD = 0.5017926


def build_source(out: Path) -> Path:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from definemed.data.loaders import load_mc_items, load_prompts, read_web_pandas, sample_mc_config, \
        sample_web_config
    from definemed.data.sample import SAMPLE_PROMPTS

    docs = read_web_pandas(sample_web_config())[["id", "text"]]
    q = load_mc_items(sample_mc_config("mmlu"))[3]
    prompt = load_prompts(SAMPLE_PROMPTS)[0]
    base = docs["text"].iloc[5]
    planted = pd.DataFrame([
        {"id": "zz-dup", "text": base.replace(" ", "  ", 3) + "\n"},
        {"id": "zz-bench", "text": "Übungsfrage aus dem Forum: " + q.question + " " + " ".join(q.choices)},
        {"id": "zz-prompt", "text": "Jemand fragte heute: " + prompt.prompt + " Die Antworten waren gemischt."},
        {"id": "zz-pii", "text": "Die Praxis informiert über Impfungen gegen Grippe. Termine unter "
                                 "praxis.weber@beispiel-praxis.de oder telefonisch unter +49 30 1234567 bzw. "
                                 "0171-7654321. Der Server 10.1.2.3 ist am Wochenende nicht erreichbar."},
        {"id": "zz-empty", "text": ""}, {"id": "zz-ws", "text": " \n\t "}, {"id": "zz-null", "text": None},
        {"id": "zz-big", "text": "Wort " * 2000},
    ])
    df = pd.concat([docs, planted], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("text", pa.string()), ("id", pa.string())])
    for i, part in enumerate((df.iloc[0::3], df.iloc[1::3], df.iloc[2::3])):
        pq.write_table(pa.Table.from_pandas(part[["text", "id"]], schema=schema, preserve_index=False),
                       out / f"part-{i}.parquet")
    return out


def filter_cfg(src: Path, out: Path, model_dir: str, **kw: Any):
    from definemed.corpus.config import FilterConfig
    from definemed.data.loaders import sample_mc_config
    from definemed.data.sample import SAMPLE_PROMPTS

    return FilterConfig(output_dir=str(out), source={"path": str(src), "columns": {"url": None}},
                        classifier=model_dir, threshold=THRESHOLD, min_actors=1, max_actors=2, batch_size=16,
                        max_length=128, max_text_chars=5000,
                        decontam={"mc": [sample_mc_config("mmlu").model_dump(), sample_mc_config("medqa").model_dump()],
                                  "prompts": [str(SAMPLE_PROMPTS)]}, **kw)


def summarise(out_dir: Path) -> dict[str, Any]:
    import pandas as pd

    fin = pd.read_parquet(out_dir / "finemed_de").sort_values("id")
    stats = json.loads((out_dir / "stats.json").read_text(encoding="utf-8"))
    steps = stats["steps"]
    removed = pd.read_parquet(out_dir / "decontaminated.parquet") if (out_dir / "decontaminated.parquet").exists() \
        else pd.DataFrame({"id": []})
    return {
        "columns": list(pd.read_parquet(out_dir / "finemed_de").columns),
        "docs": [[i, hashlib.sha256(t.encode("utf-8")).hexdigest()[:16], round(float(s), 7)]
                 for i, t, s in zip(fin["id"], fin["text"], fin["score"])],
        "steps": {k: steps[k] for k in ("scored_docs", "scored_words", "kept_docs", "kept_words",
                                        "after_dedup_docs", "duplicates_removed", "contaminated_removed",
                                        "final_docs", "final_words")},
        "pii_redacted": {k: steps["pii_redacted"].get(k, 0) for k in ("email", "phone", "ip")},
        "quarantine": stats["quarantine"],
        "decontaminated": sorted(removed["id"].astype(str)),
        "source": stats["source"], "filtered": stats["filtered"],
    }
