"""One report per evaluation run: Markdown, HTML (same content) and PNG plots, beside the lineage manifest."""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from definemed.io import atomic_write_text
from definemed.models import is_meaningless_model

MEANINGLESS_NOTE = ("**The numbers in this report carry no meaning.** At least one model is a tiny randomly "
                    "initialised model (or was trained from one); the report proves the evaluation code paths, "
                    "not model quality.")


def is_meaningless(cfg) -> bool:
    if cfg.report.meaningless is not None:
        return cfg.report.meaningless
    refs = list(cfg.models.values()) + ([cfg.judge] if cfg.judge is not None else [])
    return any(is_meaningless_model(r.path) for r in refs)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(d: dict) -> str:
    if not d or d.get("n", 0) == 0 or d.get("value") is None or math.isnan(d["value"]):
        return "n/a"
    lo, hi = d.get("lo"), d.get("hi")
    span = "" if lo is None or math.isnan(lo) else f" [{_pct(lo)}, {_pct(hi)}]"
    return f"{_pct(d['value'])}{span}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: Path, ylabel: str, title: str, legend_size: int) -> Path:
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mc(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    models = sorted({r["model"] for r in rows})
    groups = sorted({(r["benchmark"], r["subject"]) for r in rows}, key=lambda g: (g[0], g[1] == "overall", g[1]))
    by = {(r["benchmark"], r["subject"], r["model"]): r for r in rows}
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * max(1, len(models)) * 0.6 + 2), 4))
    for i, m in enumerate(models):
        xs, ys, err = [], [], [[], []]
        for g, (b, s) in enumerate(groups):
            r = by.get((b, s, m))
            if r is None:
                continue
            xs.append(g + (i - (len(models) - 1) / 2) * width)
            ys.append(r["accuracy"])
            err[0].append(max(0.0, r["accuracy"] - r["lo"]))
            err[1].append(max(0.0, r["hi"] - r["accuracy"]))
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=m)
    ax.set_xticks(range(len(groups)), [f"{b}\n{s}" for b, s in groups], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    return _finish(plt, fig, ax, path, "accuracy (95% bootstrap CI)", "Multiple choice: accuracy per subject", 7)


def plot_win_rates(comparisons: list[dict], path: Path) -> Path:
    plt = _plt()
    labels = [f"{c['candidate']} vs {c['opponent']}" for c in comparisons]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels) + 2), 3.8))
    for off, key, name in ((-0.2, "win_rate", "win-rate"), (0.2, "lc_win_rate", "length-controlled")):
        vals = [c[key]["value"] for c in comparisons]
        lo = [max(0.0, v - c[key]["lo"]) if not math.isnan(c[key]["lo"]) else 0 for v, c in zip(vals, comparisons)]
        hi = [max(0.0, c[key]["hi"] - v) if not math.isnan(c[key]["hi"]) else 0 for v, c in zip(vals, comparisons)]
        vals = [0 if math.isnan(v) else v for v in vals]
        ax.bar([i + off for i in range(len(labels))], vals, 0.38, yerr=[lo, hi], capsize=3, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1)
    return _finish(plt, fig, ax, path, "win-rate (95% bootstrap CI)", "Pairwise LLM-judge win-rate", 8)


def plot_verbosity(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    allw = [w for r in rows for w in r["words"]]
    bins = min(30, max(5, len(set(allw))))
    for r in rows:
        ax.hist(r["words"], bins=bins, range=(0, max(allw) if allw else 1), alpha=0.45, label=r["model"])
    ax.set_xlabel("words per answer")
    return _finish(plt, fig, ax, path, "answers", "Verbosity", 8)


def plot_perplexity(rows: list[dict], path: Path) -> Path:
    """Perplexity per model and set (one backend: transformers when present), with bootstrap CIs."""
    plt = _plt()
    backend = "transformers" if any(r["backend"] == "transformers" for r in rows) else rows[0]["backend"]
    rows = [r for r in rows if r["backend"] == backend]
    models = list(dict.fromkeys(r["model"] for r in rows))
    sets = sorted({r["set"] for r in rows})
    by = {(r["model"], r["set"]): r for r in rows}
    width = 0.8 / max(1, len(sets))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(models) + 2), 4))
    for i, st in enumerate(sets):
        xs = [m + (i - (len(sets) - 1) / 2) * width for m in range(len(models))]
        r = [by.get((m, st)) for m in models]
        ys = [x["value"] if x else 0 for x in r]
        err = [[max(0.0, x["value"] - x["lo"]) if x else 0 for x in r], [max(0.0, x["hi"] - x["value"]) if x else 0
                                                                          for x in r]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=st)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    return _finish(plt, fig, ax, path, f"perplexity ({backend}, 95% bootstrap CI)",
                   "Held-out perplexity (lower is better)", 8)


def plot_instructions(rows: list[dict], path: Path) -> Path:
    """Per model: prompt-level strict accuracy on each set, the language-gated score and LPR on the non-English
    sets, with CIs."""
    plt = _plt()
    rows = [r for r in rows if not r.get("point")]
    models = list(dict.fromkeys(r["model"] for r in rows))
    bars = []  # (label, {model: estimate})
    for set_name in dict.fromkeys(r["set"] for r in rows):
        by = {r["model"]: r for r in rows if r["set"] == set_name}
        bars.append((f"{set_name}: prompt-level strict", {m: by[m]["prompt_strict"] for m in by}))
        if any(by[m].get("gated") and by[m]["lang"] != "en" for m in by):
            bars.append((f"{set_name}: language-gated", {m: by[m]["gated"] for m in by}))
            bars.append((f"{set_name}: LPR", {m: by[m]["lpr"] for m in by}))
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(models) + 3), 4))
    for i, (label, est) in enumerate(bars):
        xs = [m + (i - (len(bars) - 1) / 2) * width for m in range(len(models))]
        e = [est.get(m) or {"value": 0, "lo": 0, "hi": 0} for m in models]
        ys = [0 if math.isnan(x["value"]) else x["value"] for x in e]
        err = [[0 if math.isnan(x["lo"]) else max(0.0, y - x["lo"]) for x, y in zip(e, ys)],
               [0 if math.isnan(x["hi"]) else max(0.0, x["hi"] - y) for x, y in zip(e, ys)]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.set_ylim(0, 1.05)
    return _finish(plt, fig, ax, path, "share (95% bootstrap CI)", "Instruction following and language", 7)


def plot_qa(rows: list[dict], path: Path) -> Path:
    """EM and F1 per model, zero- and one-shot, with bootstrap CIs."""
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    bars = [(f"{k.upper()} {mode.replace('_', '-')}", {r["model"]: r[k] for r in rows if r["mode"] == mode})
            for mode in dict.fromkeys(r["mode"] for r in rows) for k in ("em", "f1")]
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.4 * len(models) + 3), 4))
    for i, (label, est) in enumerate(bars):
        xs = [m + (i - (len(bars) - 1) / 2) * width for m in range(len(models))]
        e = [est.get(m) or {"value": 0, "lo": 0, "hi": 0} for m in models]
        ys = [x["value"] for x in e]
        err = [[max(0.0, y - x["lo"]) for x, y in zip(e, ys)], [max(0.0, x["hi"] - y) for x, y in zip(e, ys)]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    return _finish(plt, fig, ax, path, "score (95% bootstrap CI)", "German extractive QA (SQuAD-style)", 7)


def plot_retention(ret: dict, path: Path) -> Path:
    """Student ÷ teacher per metric (1 = kept everything), one bar per student, with paired bootstrap CIs."""
    plt = _plt()
    rows = ret["rows"]
    metrics = list(dict.fromkeys(r["label"] for r in rows))
    students = list(dict.fromkeys(r["student"] for r in rows))
    by = {(r["label"], r["student"]): r["retention"] for r in rows}
    width = 0.8 / max(1, len(students))
    fig, ax = plt.subplots(figsize=(max(6.5, 0.7 * len(metrics) * max(1, len(students)) + 3), 4.2))
    for i, st in enumerate(students):
        xs, ys, lo, hi = [], [], [], []
        for j, m in enumerate(metrics):
            e = by.get((m, st))
            if e is None or e["value"] is None or math.isnan(e["value"]):
                continue
            xs.append(j + (i - (len(students) - 1) / 2) * width)
            ys.append(e["value"])
            lo.append(0 if math.isnan(e["lo"]) else max(0.0, e["value"] - e["lo"]))
            hi.append(0 if math.isnan(e["hi"]) else max(0.0, e["hi"] - e["value"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=st)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(metrics)), metrics, rotation=35, ha="right", fontsize=7)
    return _finish(plt, fig, ax, path, "student ÷ teacher (95% paired bootstrap CI)",
                   f"Retention of {ret['teacher']} (1 = kept everything)", 8)


# ---------------------------------------------------------------- markdown
def _md_models(cfg) -> list[str]:
    rows = []
    for name, ref in cfg.models.items():
        via = f"endpoint {ref.endpoint.base_url} (model {ref.endpoint.model})" if ref.endpoint else "serve app"
        rows.append([name, ref.path or "", via])
    if cfg.judge is not None:
        rows.append(["judge", cfg.judge.path or "", f"endpoint {cfg.judge.endpoint.base_url}" if cfg.judge.endpoint
                     else "serve app"])
    return ["## Models", "", _table(["model", "weights", "answers via"], rows), ""]


def chance_note(table: list[dict]) -> str | None:
    """A warning when no model's overall accuracy is distinguishable from guessing (CI contains chance)."""
    overall = [r for r in table if r["subject"] == "overall" and r.get("chance") is not None]
    if not overall or any(r["lo"] > r["chance"] or r["hi"] < r["chance"] for r in overall):
        return None
    return ("Every model's overall accuracy has chance level inside its 95% CI: these MC numbers do not tell the "
            "models apart, and differences of a few items are noise.")


def _md_mc(mc: dict, plots: dict[str, str]) -> list[str]:
    models = sorted({r["model"] for r in mc["table"]})
    by = {(r["benchmark"], r["subject"], r["model"]): r for r in mc["table"]}
    groups = sorted({(r["benchmark"], r["subject"]) for r in mc["table"]},
                    key=lambda g: (g[0], g[1] == "overall", g[1]))
    trows = []
    for b, s in groups:
        n = next(by[(b, s, m)]["n"] for m in models if (b, s, m) in by)
        cells = []
        for m in models:
            r = by.get((b, s, m))
            cells.append("" if r is None else _ci({"value": r["accuracy"], "lo": r["lo"], "hi": r["hi"], "n": r["n"]})
                         + (f" ({r['unparsed']} unparsed)" if r["unparsed"] else ""))
        chance = next((by[(b, s, m)].get("chance") for m in models if (b, s, m) in by), None)
        trows.append([b, f"**{s}**" if s == "overall" else s, n, _pct(chance), *cells])
    sc, pr = mc["scoring"], mc["prompt"]
    how = ("log-likelihood of the answer letters" if sc["mode"] == "loglik" else "generate and parse")
    md = ["## Multiple choice", "",
          f"Accuracy in % with 95% bootstrap CIs. Scoring: {how} ({sc['backend']}); "
          f"{pr['shots']}-shot German prompts. Chance: the accuracy of guessing (1 / options, averaged).", ""]
    note = chance_note(mc["table"])
    if note:
        md += [f"> {note}", ""]
    md += [_table(["benchmark", "subject", "n", "chance", *models], trows), ""]
    if "mc" in plots:
        md += [f"![accuracy per subject]({plots['mc']})", ""]
    return md


def _md_pairwise(pw: dict, plots: dict[str, str]) -> list[str]:
    rows = []
    for c in pw["comparisons"]:
        rows.append([f"{c['candidate']} vs {c['opponent']}", c["n"], c["win"], c["tie"], c["loss"],
                     c["unparsed"], _ci(c["win_rate"]), _ci(c["lc_win_rate"]), _ci(c["position_consistency"]),
                     f"{c['mean_len_candidate']:.0f} / {c['mean_len_opponent']:.0f}"])
    md = ["## Pairwise win-rate", "",
          f"Judge: `{pw['judge']}`, German rubric (correctness, completeness, safety, language). Every pair "
          "is judged in both orders; disagreeing verdicts count as a tie. Win-rate = (wins + ½ ties) / n "
          "over parsed pairs, in %, with 95% bootstrap CIs. Length-controlled (LC): logistic model of the "
          "outcome on tanh(length difference / sd), read at zero difference (AlpacaEval-LC style). "
          f"Unparsed judge outputs: {pw['unparsed_judgments']} of {pw['judgments']} judgments; a pair with "
          "an unparsed verdict is counted as `unparsed` and left out of n.", "",
          _table(["comparison", "n", "wins", "ties", "losses", "unparsed", "win-rate %", "LC win-rate %",
                  "position consistency %", "mean words (cand / opp)"], rows), ""]
    if "win_rate" in plots:
        md += [f"![win-rates]({plots['win_rate']})", ""]
    return md


def _md_failure_modes(fm: list[dict], plots: dict[str, str]) -> list[str]:
    rows = []
    for r in fm:
        tok = "n/a" if r["tokens_mean"] is None else f"{r['tokens_mean']:.0f}"
        flag = lambda k: "n/a" if r[k] is None else r[k]  # noqa: E731
        rows.append([r.get("set", "clinical"), r["model"], r["answers"], f"{r['language_mixing']}/{r['answers']}",
                     _ci(r.get("lpr") or {}), _ci(r.get("word_confusion") or {}),
                     f"{r['words_mean']:.0f} / {r['words_median']:.0f}", tok, r["typos"],
                     r["answers_with_typos"], flag("hallucination"), flag("overconfidence"), flag("contradiction")])
    md = ["## Failure modes", "",
          "Per model, on the same German prompts (`clinical`: the clinical prompts of the pairwise comparison; "
          "`instructions-…`: the German instruction set). Language mixing, three ways: the study's count of "
          "answers with at least one non-German sentence (sentence-level offline language ID, lingua; it sees a "
          "switch inside a one-paragraph answer), and the Language Confusion Benchmark's rates: LPR, the share "
          "of answers whose every line of 5+ words is German (answers without such a line are skipped), and "
          "word confusion, the share of words in German lines that lingua places in another language; both in % "
          "with 95% bootstrap CIs. Typos: German hunspell (de_DE, compound-aware) outside foreign sentences, "
          "with a medical-term allowlist. Hallucination / overconfidence / contradiction: answers the judge "
          "labelled so in more than half of its judgments of them (n/a without a judge).", "",
          _table(["set", "model", "answers", "language mixing (sentences)", "LPR %", "word confusion %",
                  "words mean / median", "tokens mean", "typos", "answers with typos", "hallucination",
                  "overconfidence", "contradiction"], rows), ""]
    if "verbosity" in plots:
        md += [f"![verbosity]({plots['verbosity']})", ""]
    ex = [(r["model"], k, v) for r in fm for k, vs in r["examples"].items() for v in vs[:3]]
    if ex:
        md += ["<details><summary>Examples</summary>", "", _table(["model", "kind", "example"], ex), "",
               "</details>", ""]
    return md


def _num(x: float, fmt: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _md_perplexity(ppl: dict, plots: dict[str, str]) -> list[str]:
    rows = []
    for r in ppl["table"]:
        agree = "" if "agree" not in r else ("yes" if r["agree"] else "**no**") + f" ({100 * r['rel_diff']:.2f}%)"
        rows.append([r["model"], r["set"], r["backend"], f"{_num(r['value'])} [{_num(r['lo'])}, {_num(r['hi'])}]",
                     r["docs"], r["tokens"], agree])
    md = ["## Held-out perplexity", "",
          f"Token-weighted perplexity (exp of the summed token NLL over all predicted tokens), each document cut to "
          f"its first {ppl['max_tokens']} tokens and opened with the tokenizer's special tokens; 95% bootstrap CI "
          "over documents. Lower is better. The backends compute the same NLLs from the same token ids (vLLM "
          f"prompt logprobs, transformers fp32 forward); they agree when within {100 * ppl['tolerance']:.0f}% "
          "of each other.", "",
          _table(["model", "set", "backend", "perplexity [95% CI]", "docs", "tokens", "backends agree"], rows), ""]
    if "perplexity" in plots:
        md += [f"![perplexity]({plots['perplexity']})", ""]
    return md


def _md_frontier(fr: dict, plots: dict[str, str]) -> list[str]:
    from definemed.eval.frontier import INSTRUCTION_COLUMNS

    rows = [r for r in fr["rows"]]
    sets = sorted({k[4:] for r in rows for k in r if k.startswith("ppl_") and not k.endswith(("_lo", "_hi"))})
    icols = [c for c, _, _ in INSTRUCTION_COLUMNS if any(not math.isnan(r.get(c, math.nan)) for r in rows)]
    mc = any(not math.isnan(r["mc_accuracy"]) for r in rows)
    names = {"if_en": "IF en, prompt strict %", "if_de_gated": "IF de, language-gated %", "lpr_de": "LPR de %"}
    trows = [[r["model"], "" if r["t"] is None else f"{r['t']:g}", *[_num(r[f"ppl_{s}"]) for s in sets],
              *([_pct(r["mc_accuracy"])] if mc else []), *[_pct(r[c]) for c in icols]] for r in rows]
    md = ["## Merge frontier", "",
          f"SLERP from `{fr['model_a']}` (t = 0) to `{fr['model_b']}` (t = 1) with one t for every tensor, each "
          "point scored on the perplexity sets" + (" and the MC items (accuracy pooled over all items, in %)" if mc
                                                   else "")
          + (", and asked the instruction sets (prompt-level strict accuracy on English, the language-gated "
             "score and LPR on German)" if icols else "")
          + ". Marked models (e.g. the study's layer-wise schedule) sit off the uniform curve when the schedule "
          "buys a better trade.", "",
          _table(["model", "t", *[f"{s} perplexity" for s in sets], *(["MC accuracy %"] if mc else []),
                  *[names[c] for c in icols]], trows), ""]
    for key, alt in (("frontier", "merge frontier"), ("frontier_if", "merge frontier: instruction following")):
        if key in plots:
            md += [f"![{alt}]({plots[key]})", ""]
    return md


def _md_instructions(ins: dict, plots: dict[str, str]) -> list[str]:
    rows = []
    for r in ins["rows"]:
        tok = "n/a" if not r.get("tokens") else f"{r['tokens']['value']:.0f}"
        rows.append([r["model"] + (" (frontier point)" if r.get("point") else ""), r["set"], r["n"],
                     _ci(r["prompt_strict"]), _ci(r["prompt_loose"]), _ci(r["instruction_strict"]),
                     _ci(r["instruction_loose"]), _ci(r["gated"]) if r["lang"] != "en" else "",
                     _ci(r["lpr"]) + (f" ({r['language_skipped']} skipped)" if r["language_skipped"] else ""),
                     _ci(r["word_confusion"]), tok, f"{r['words']['value']:.0f}", r["truncated"]])
    gen = ins["generation"]
    systems = "; ".join(f"`{n}`: " + (f"\"{st['system_prompt']}\"" if st["system_prompt"] else
                                      "none (the model's template default)") for n, st in ins["sets"].items())
    md = ["## Instruction following", "",
          "IFEval-style verifiable instructions (definemed.eval.instructions), 1-3 per prompt, on parallel German "
          "and English clinical prompts; answers through each model's OpenAI chat route with its own chat "
          f"template, greedy, at most {gen['max_tokens']} tokens (frontier points: a local vLLM engine's chat, the "
          f"same template). System prompts: {systems}. Prompt-level: all instructions of a prompt pass; "
          "instruction-level: the share of instructions that pass; strict: the answer as given; loose: IFEval's "
          "variants (first/last line or `*` removed). Language-gated (German): a prompt counts only if its "
          "instructions pass strictly **and** every line of 5+ words is German. LPR and word confusion: the "
          "Language Confusion Benchmark's line pass rate and word-level confusion in the set's language. All in "
          "% with 95% bootstrap CIs over prompts. Truncated: answers cut at max_tokens.", "",
          _table(["model", "set", "n", "prompt strict %", "prompt loose %", "instruction strict %",
                  "instruction loose %", "language-gated %", "LPR %", "word confusion %", "tokens mean",
                  "words mean", "truncated"], rows), ""]
    if "instructions" in plots:
        md += [f"![instruction following]({plots['instructions']})", ""]
    types = sorted({t for r in ins["rows"] for t in r["per_type"]})
    trows = [[r["model"], r["set"], *[(f"{r['per_type'][t]['passed']}/{r['per_type'][t]['n']}"
                                       if t in r["per_type"] else "") for t in types]]
             for r in ins["rows"] if not r.get("point")]
    md += ["<details><summary>Strict passes per instruction type</summary>", "",
           _table(["model", "set", *types], trows), "", "</details>", ""]
    return md


def _md_qa(qa: dict, plots: dict[str, str]) -> list[str]:
    split = qa.get("from_trained_documents") is not None
    rows = [[r["model"], r["mode"].replace("_", "-"), r["n"], _ci(r["em"]), _ci(r["f1"]),
             *([f"{_ci(r['heldout']['em'])} / {_ci(r['heldout']['f1'])} (n={r['heldout']['n']})"] if split else []),
             r["empty"], r["truncated"]] for r in qa["rows"]]
    gen = qa["generation"]
    md = ["## Extractive QA (German)", "",
          f"SQuAD-style extractive QA on `{qa['path']}` ({len(qa['items'])} scored items, each a passage of a "
          "bundled medical document with a question whose answer is a span of it). Asked through each model's "
          f"OpenAI chat route, greedy, at most {gen['max_tokens']} tokens; zero-shot: the passage and the "
          "question; one-shot: one exemplar item from the pool (never the scored item or its document) and its "
          "gold answer as a previous turn. The answer is the first non-empty line of the completion without an "
          "\"Antwort:\" label. Exact match (EM) and token F1, maximum over the gold answers, after MLQA's German "
          "normalisation (lower case, no punctuation, no articles); in % with 95% bootstrap CIs over items. "
          "Empty: no answer line; truncated: cut at max_tokens.", ""]
    if split:
        md += [f"> {qa['from_trained_documents']} of the {len(qa['items'])} scored passages come from documents "
               f"that the pack run `{qa['trained_on']}` trained on (CPT / distillation data); the held-out column "
               "scores only the others.", ""]
    md += [_table(["model", "prompting", "n", "EM %", "F1 %", *(["held-out docs EM / F1 %"] if split else []),
                   "empty", "truncated"], rows), ""]
    if "qa" in plots:
        md += [f"![extractive QA]({plots['qa']})", ""]
    return md


def _fmt_value(metric: str, x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return _num(x) if metric.startswith("ppl_") else _pct(x)


def _ratio(e: dict) -> str:
    if not e or e.get("value") is None or math.isnan(e["value"]):
        return "n/a"
    span = "" if math.isnan(e["lo"]) else f" [{e['lo']:.3f}, {e['hi']:.3f}]"
    return f"{e['value']:.3f}{span}"


def _md_retention(ret: dict, plots: dict[str, str]) -> list[str]:
    students = list(dict.fromkeys(r["student"] for r in ret["rows"])) or ret["students"]
    by = {(r["metric"], r["student"]): r for r in ret["rows"]}
    metrics = list(dict.fromkeys((r["metric"], r["label"]) for r in ret["rows"]))
    trows = []
    for m, label in metrics:
        first = next(by[(m, s)] for s in students if (m, s) in by)
        cells = []
        for s in students:
            r = by.get((m, s))
            cells += ["", ""] if r is None else [_fmt_value(m, r["student_value"]), _ratio(r["retention"])]
        trows.append([label + (" (lower is better)" if first["lower_better"] else ""), first["n"],
                      _fmt_value(m, first["teacher_value"]), *cells])
    head = ["metric", "n", f"teacher `{ret['teacher']}`"]
    for s in students:
        head += [f"`{s}`", f"`{s}` ÷ teacher"]
    md = ["## Retention", "",
          f"How much of the teacher `{ret['teacher']}` each student keeps: student ÷ teacher on the same items, so "
          "1.0 means it kept everything and less than 1 means it lost some. Held-out perplexity (lower is better) "
          "enters as perplexity_teacher ÷ perplexity_student = exp(CE_teacher − CE_student), the geometric-mean "
          "ratio of the probability the student gives each held-out token to the teacher's; every other metric "
          "as metric_student ÷ metric_teacher (values in %, perplexity as is). 95% paired bootstrap CIs: each "
          "resample draws the same documents or items for teacher and student.", ""]
    for note in ret.get("notes") or []:
        md += [f"> {note}", ""]
    md += [_table(head, trows), ""]
    if "retention" in plots:
        md += [f"![retention]({plots['retention']})", ""]
    prow = [[r["model"], r["role"], "n/a" if r["parameters"] is None else f"{r['parameters'] / 1e6:.1f}M",
             "" if r["reduction"] is None or r["role"] == "teacher" else f"{100 * r['reduction']:.1f}%"]
            for r in ret["parameters"]]
    md += ["**Parameters** (counted from each model directory's safetensors; a tied output layer counts once):", "",
           _table(["model", "role", "parameters", "fewer than the teacher"], prow), ""]
    if ret.get("control"):
        c = ret["control"]
        krows = [[r["label"] + (" (lower is better)" if r["lower_better"] else ""), r["n"],
                  _fmt_value(r["metric"], r["kd_value"]), _fmt_value(r["metric"], r["ce_value"]),
                  (f"{r['difference']['value']:+.3f} [{r['difference']['lo']:+.3f}, {r['difference']['hi']:+.3f}]"
                   if r["metric"].startswith("ppl_") else
                   f"{100 * r['difference']['value']:+.1f} [{100 * r['difference']['lo']:+.1f}, "
                   f"{100 * r['difference']['hi']:+.1f}]"), f"**{r['verdict']}**"]
                 for r in ret["kd_vs_ce"]]
        md += [f"**KD against the CE-only control**: `{c['kd']}` (distilled) against `{c['ce']}` (the same "
               "student trained with cross-entropy only on the same tokens). Difference KD − CE-only with a 95% "
               "paired bootstrap CI over the same resampled held-out documents (perplexity, token-weighted) or QA "
               "items (F1, in points).", "",
               _table(["metric", "n", "KD", "CE-only", "KD − CE-only [95% CI]", "verdict"], krows)
               if krows else "No metric of the comparison was scored.", ""]
    return md


_LINEAGE = ["## Lineage", "", "Resolved config, package versions, git revision and input hashes: "
            "[`lineage.json`](lineage.json). Raw results: [`results.json`](results.json); answers: "
            "`answers.json`, `instruction_answers.json`; cached requests: `cache/`; MC predictions: `mc/`; "
            "per-document NLLs: `perplexity/`; retention table: `retention.json` (when configured).", ""]


def render_markdown(cfg, results: dict, plots: dict[str, str]) -> str:
    md = [f"# {cfg.report.title}", ""]
    if results.get("meaningless"):
        md += [f"> {MEANINGLESS_NOTE}", ""]
    if cfg.report.note:
        md += [f"> {cfg.report.note}", ""]
    md += _md_models(cfg)
    if results.get("retention"):
        md += _md_retention(results["retention"], plots)
    if results.get("perplexity"):
        md += _md_perplexity(results["perplexity"], plots)
    if results.get("frontier"):
        md += _md_frontier(results["frontier"], plots)
    if results.get("instructions"):
        md += _md_instructions(results["instructions"], plots)
    if results.get("qa"):
        md += _md_qa(results["qa"], plots)
    if results.get("mc"):
        md += _md_mc(results["mc"], plots)
    if results.get("pairwise"):
        md += _md_pairwise(results["pairwise"], plots)
    if results.get("failure_modes"):
        md += _md_failure_modes(results["failure_modes"], plots)
    return "\n".join(md + _LINEAGE)


def render_html(markdown_text: str, title: str) -> str:
    try:
        from markdown_it import MarkdownIt

        body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown_text)
    except ImportError:  # markdown-it comes with rich/typer; if absent, the text stays readable
        body = f"<pre>{html.escape(markdown_text)}</pre>"
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "blockquote{background:#fff3cd;border-left:4px solid #e0a800;margin:0;padding:.5em 1em}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")


def write_report(cfg, results: dict, out: Path) -> dict[str, str]:
    plots: dict[str, str] = {}
    if cfg.report.plots:
        pdir = out / "plots"
        pdir.mkdir(parents=True, exist_ok=True)
        if results.get("mc"):
            plots["mc"] = plot_mc(results["mc"]["table"], pdir / "mc_accuracy.png").relative_to(out).as_posix()
        if results.get("pairwise") and results["pairwise"]["comparisons"]:
            plots["win_rate"] = plot_win_rates(results["pairwise"]["comparisons"],
                                               pdir / "win_rates.png").relative_to(out).as_posix()
        if results.get("perplexity"):
            plots["perplexity"] = plot_perplexity(results["perplexity"]["table"],
                                                  pdir / "perplexity.png").relative_to(out).as_posix()
        if results.get("frontier"):
            from definemed.eval.frontier import plot_frontier

            sets = sorted({r["set"] for r in results["perplexity"]["table"]})
            x_set, y_set = ("general", "medical") if {"general", "medical"} <= set(sets) else (sets[-1], sets[0])
            plots["frontier"] = plot_frontier(results["frontier"]["rows"], pdir / "frontier.png", x_set, y_set,
                                              title=cfg.report.title + ": merge frontier").relative_to(out).as_posix()
            if any(not math.isnan(r.get("if_de_gated", math.nan)) for r in results["frontier"]["rows"]):
                plots["frontier_if"] = plot_frontier(
                    results["frontier"]["rows"], pdir / "frontier_instructions.png", y_set=y_set,
                    title=cfg.report.title + ": medical knowledge vs instruction following",
                    panels=[("if_de_gated", "German instructions, language-gated prompt-level (higher is better)"),
                            ("if_en", "English instructions, prompt-level strict (higher is better)")],
                ).relative_to(out).as_posix()
        if results.get("instructions"):
            plots["instructions"] = plot_instructions(results["instructions"]["rows"],
                                                      pdir / "instructions.png").relative_to(out).as_posix()
        if results.get("qa") and results["qa"]["rows"]:
            plots["qa"] = plot_qa(results["qa"]["rows"], pdir / "qa.png").relative_to(out).as_posix()
        if results.get("retention") and results["retention"]["rows"]:
            plots["retention"] = plot_retention(results["retention"],
                                                pdir / "retention.png").relative_to(out).as_posix()
        if results.get("failure_modes"):
            plots["verbosity"] = plot_verbosity(results["failure_modes"],
                                                pdir / "verbosity.png").relative_to(out).as_posix()
    md = render_markdown(cfg, results, plots)
    paths = {"report_md": str(atomic_write_text(out / "report.md", md))}
    if cfg.report.html:
        paths["report_html"] = str(atomic_write_text(out / "report.html", render_html(md, cfg.report.title)))
    for k, v in plots.items():
        paths[f"plot_{k}"] = str(out / v)
    return paths
