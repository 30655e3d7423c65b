"""The measured table (Markdown, CSV, JSON) and its plot."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from definemed.tokenizers.families import FAMILIES

TABLE_JSON = "fertility.json"
TABLE_CSV = "fertility.csv"
TABLE_MD = "fertility.md"
PLOT = "fertility.png"

CSV_COLUMNS = ("tokenizer", "family", "tiny", "vocab_size", "set", "set_kind", "texts", "words", "tokens",
               "fertility", "fertility_lo", "fertility_hi", "split_words", "split_share", "unaligned_texts",
               "words_en", "tokens_en", "fertility_en", "split_share_en", "parity", "parity_lo", "parity_hi",
               "ci_items")


def _f(x: Any, nd: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ci(r: dict, key: str, nd: int = 2) -> str:
    return f"{_f(r.get(key), nd)} [{_f(r.get(key + '_lo'), nd)}, {_f(r.get(key + '_hi'), nd)}]"


def _label(r: dict) -> str:
    return f"{r['tokenizer']} (tiny)" if r["tiny"] else r["tokenizer"]


def _family(r: dict) -> str:
    fam = FAMILIES.get(r["family"] or "")
    return fam.label if fam else "– (tiny)" if r["tiny"] else (r["family"] or "–")


def notes(doc: dict[str, Any]) -> list[str]:
    out = []
    tiny = [t["name"] for t in doc["tokenizers"] if t["tiny"]]
    if tiny:
        out.append(f"**tiny** ({', '.join(tiny)}): tokenizers that definemed trained on the bundled sample text "
                   "(vocabulary 4,096). They have seen these very texts, and their numbers describe no real "
                   "tokenizer: not Qwen2.5's, not XLM-R's.")
    measured = {t["family"] for t in doc["tokenizers"] if not t["tiny"]}
    for key, fam in FAMILIES.items():
        if key not in measured:
            out.append(f"**{fam.label}: not measured.** {fam.note or 'no tokenizer of this family was listed'}.")
    return out


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    lines = ["| set | tokenizer | family | vocabulary | texts | words | tokens | fertility [95% CI] | split share |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        lines.append(f"| {r['set']} | {_label(r)} | {_family(r)} | {r['vocab_size']:,} | {r['texts']:,} | "
                     f"{r['words']:,} | {r['tokens']:,} | {_ci(r, 'fertility')} | {_f(r['split_share'] * 100, 1)}% |")
    par = [r for r in rows if r["set_kind"] == "parallel"]
    if par:
        lines += ["", "| parallel set | tokenizer | family | vocabulary | pairs | tokens de | tokens en | "
                  "fertility de | fertility en | parity de/en [95% CI] |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in par:
            lines.append(f"| {r['set']} | {_label(r)} | {_family(r)} | {r['vocab_size']:,} | {r['texts']:,} | "
                         f"{r['tokens']:,} | {r['tokens_en']:,} | {_f(r['fertility'])} | {_f(r['fertility_en'])} | "
                         f"{_ci(r, 'parity')} |")
    sets = "; ".join(f"**{s['name']}**: {s['description']} ({s['texts']:,} texts, {s['words']:,} words"
                     + (f", first {s['limit']:,}" if s.get("limit") else "") + ")" for s in doc["sets"])
    body = ["# Tokenizer fertility and parity", "", *lines, "", f"Sets: {sets}.", ""]
    body += [f"- {n}" for n in notes(doc)]
    body += ["", "Fertility = tokens / words (`definemed.text.words`, special tokens excluded); split share = words "
             "with 2 or more tokens overlapping them; parity = German tokens / English tokens over the parallel "
             "pairs (Petrov et al. 2023, ratio of totals). CIs: percentile bootstrap over texts or pairs "
             f"({doc['n_boot']} resamples, seed {doc['seed']}). Definitions: docs/tokenizers.md.", ""]
    return "\n".join(body)


def to_csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in doc["rows"]:
        w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
    return buf.getvalue()


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = doc["rows"]
    toks = [t["name"] for t in doc["tokenizers"]]
    tiny = {t["name"] for t in doc["tokenizers"] if t["tiny"]}
    sets = [s["name"] for s in doc["sets"]]
    by = {(r["tokenizer"], r["set"]): r for r in rows}
    par = [s["name"] for s in doc["sets"] if s["kind"] == "parallel"]
    fig, axes = plt.subplots(1, 2 if par else 1, figsize=(13 if par else 8, 4.6),
                             gridspec_kw={"width_ratios": [2, 1]} if par else None, squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(toks))
    width = 0.8 / max(1, len(sets))
    for j, s in enumerate(sets):
        vals = [by[(t, s)]["fertility"] for t in toks]
        err = [[by[(t, s)]["fertility"] - by[(t, s)]["fertility_lo"] for t in toks],
               [by[(t, s)]["fertility_hi"] - by[(t, s)]["fertility"] for t in toks]]
        bars = ax.bar(x + (j - (len(sets) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=s)
        for b, t in zip(bars, toks):
            if t in tiny:
                b.set_hatch("//")
    ax.set_xticks(x, [f"{t}\n(tiny)" if t in tiny else t for t in toks], fontsize=8)
    ax.set_ylabel("fertility (tokens per word)")
    ax.set_title("Fertility per tokenizer and set (95% CI; hatched: tiny, describes no real tokenizer)",
                 fontsize=9)
    ax.legend(fontsize=8)
    if par:
        ax2 = axes[0][1]
        s = par[0]
        vals = [by[(t, s)]["parity"] for t in toks]
        err = [[by[(t, s)]["parity"] - by[(t, s)]["parity_lo"] for t in toks],
               [by[(t, s)]["parity_hi"] - by[(t, s)]["parity"] for t in toks]]
        bars = ax2.bar(x, vals, 0.6, yerr=err, capsize=3, color="tab:gray")
        for b, t in zip(bars, toks):
            if t in tiny:
                b.set_hatch("//")
        ax2.axhline(1.0, color="k", lw=0.8, ls="--")
        ax2.set_xticks(x, [f"{t}\n(tiny)" if t in tiny else t for t in toks], fontsize=8)
        ax2.set_ylabel("parity: German tokens / English tokens")
        ax2.set_title(f"Parity against English on {s} (95% CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
