"""Annotation quality against human gold labels: P/R/F1 with bootstrap CIs and a confusion matrix.

`medical` is the positive class (what the filter keeps). `unparsed` answers are reported as their own column
and scored as "not medical" (the filter would not keep them); the coverage line says how many there were.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any


from definemed.corpus.metrics import bootstrap_prf

if TYPE_CHECKING:
    import pandas as pd

STUDY = {"f1": 0.911, "f1_pm": 0.025, "annotator": "Mixtral-8x7B-Instruct", "docs": 260_000}


def quality_report(labels: "pd.DataFrame", gold: "pd.DataFrame", gold_column: str, n_boot: int = 1000,
                   seed: int = 0, note: str | None = None) -> dict[str, Any]:
    """labels: id, label (medical|non_medical|unparsed); gold: id, <gold_column>."""
    m = labels[["id", "label"]].merge(gold[["id", gold_column]], on="id", how="inner")
    no_gold = int(m[gold_column].isna().sum())
    m = m[m[gold_column].notna()]
    y_true = (m[gold_column] == "medical").to_numpy()
    y_pred = (m["label"] == "medical").to_numpy()
    conf = {g: {p: int(((m[gold_column] == g) & (m["label"] == p)).sum())
                for p in ("medical", "non_medical", "unparsed")} for g in ("medical", "non_medical")}
    return {
        "n_labelled": int(len(labels)), "n_compared": int(len(m)), "n_without_gold": no_gold,
        "unparsed": int((m["label"] == "unparsed").sum()),
        "positive_class": "medical",
        "metrics": bootstrap_prf(y_true, y_pred, n_boot=n_boot, seed=seed),
        "bootstrap": {"resamples": n_boot, "ci": 0.95, "seed": seed},
        "confusion_matrix": {"rows": "gold", "columns": "annotator", "counts": conf},
        "study": STUDY,
        **({"note": note} if note else {}),
    }


def to_markdown(rep: dict[str, Any]) -> str:
    m = rep["metrics"]
    lines = ["# Annotation quality vs human labels", ""]
    if rep.get("note"):
        lines += [f"> **{rep['note']}**", ""]
    lines += [f"Documents compared: {rep['n_compared']} (labelled {rep['n_labelled']}, without gold "
              f"{rep['n_without_gold']}, unparsed answers {rep['unparsed']}). Positive class: medical.", "",
              "| metric | value | 95% bootstrap CI | ± (bootstrap std) |", "| --- | --- | --- | --- |"]
    for k in ("precision", "recall", "f1"):
        v = m[k]
        lines.append(f"| {k} | {100 * v['value']:.1f} | [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}] "
                     f"| {100 * v['std']:.1f} |")
    s = rep["study"]
    lines += ["", f"Study ({s['annotator']}, {s['docs']:,} docs): F1 {100 * s['f1']:.1f} ± {100 * s['f1_pm']:.1f}.",
              "", "## Confusion matrix (rows: gold, columns: annotator)", "",
              "| gold \\ annotator | medical | non_medical | unparsed |", "| --- | --- | --- | --- |"]
    for g, row in rep["confusion_matrix"]["counts"].items():
        lines.append(f"| {g} | {row['medical']} | {row['non_medical']} | {row['unparsed']} |")
    return "\n".join(lines) + "\n"


def write_report(rep: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    from definemed.io import atomic_write_text

    j = atomic_write_text(out_dir / "quality.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
    md = atomic_write_text(out_dir / "quality.md", to_markdown(rep))
    return j, md
