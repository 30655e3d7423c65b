"""The bundled sample: German web documents (FineWeb2 schema), MC benchmarks and clinical prompts.

Everything here was written for this project (see DATA_CARD.md). `src/*.jsonl` are the editable sources;
`fineweb2_de/` and `malformed/` are built from them by scripts/build_sample_data.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

SAMPLE_DIR = Path(__file__).resolve().parent
SRC_DIR = SAMPLE_DIR / "src"

#: FineWeb2-schema Parquet shards of the web documents (+ topic, gold_label, gold_rationale).
SAMPLE_WEB_DIR = SAMPLE_DIR / "fineweb2_de"
#: Deliberately malformed rows for quarantine tests; `malformed_kind` says which defect each row has.
SAMPLE_MALFORMED = SAMPLE_DIR / "malformed" / "malformed.parquet"
SAMPLE_WEB_SRC = (SRC_DIR / "web_medical.jsonl", SRC_DIR / "web_non_medical.jsonl")
#: MMLU-de style items (question, choices[4], answer index, subject): format "mmlu".
SAMPLE_MMLU = SRC_DIR / "mmlu_de.jsonl"
#: MedQA-de style items (question, options A-E, answer_idx letter, meta_info): format "medqa".
SAMPLE_MEDQA = SRC_DIR / "medqa_de.jsonl"
#: Clinical instruction prompts for pairwise judging (id, category, prompt).
SAMPLE_PROMPTS = SRC_DIR / "clinical_prompts.jsonl"
#: Parallel German / English clinical prompts with verifiable instructions (instruction following, IFEval-style).
SAMPLE_INSTRUCTIONS = SRC_DIR / "instruction_prompts.jsonl"
#: Parallel German / English medical sentences (id, topic, de, en): tokenizer parity.
SAMPLE_PARALLEL = SRC_DIR / "parallel_medical_de_en.jsonl"

MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "college_medicine", "medical_genetics",
                 "professional_medicine", "college_biology")
PROMPT_CATEGORIES = ("patient_question", "discharge_summary", "drug_interaction", "differential_diagnosis",
                     "patient_friendly_rewording")


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
