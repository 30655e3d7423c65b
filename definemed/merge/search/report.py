"""What a merge search leaves behind: every trial, the front (chosen on dev) and its test scores beside the
references', the Pareto plot, a report, and the chosen recipe as a mergekit YAML and a merge-stage config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from definemed.io import atomic_write_json, atomic_write_text
from definemed.merge.search.config import METRICS, MergeSearchConfig
from definemed.models.registry import is_meaningless_model

LABELS = {"ppl_medical": "medical ppl", "ppl_general": "general ppl", "if_en": "IF en (strict)",
          "if_de_gated": "IF de (gated)", "lpr_de": "LPR de", "answer_tokens": "answer tokens"}
PCT = {"if_en", "if_de_gated", "lpr_de"}
MEANINGLESS = ("A parent is a tiny random model: every number here proves the code path only and carries no "
               "meaning, the verdict included.")


def _fmt(metric: str, v: float | None) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{100 * v:.1f}" if metric in PCT else f"{v:.2f}" if metric.startswith("ppl_") else f"{v:.1f}"


def _fmt_est(metric: str, e: dict) -> str:
    return f"{_fmt(metric, e['value'])} [{_fmt(metric, e['lo'])}, {_fmt(metric, e['hi'])}]"


def _test_estimates(scores: dict[str, dict]) -> dict[str, dict[str, dict]]:
    from definemed.merge.search.score import estimate

    return {name: {m: estimate(m, s["items"][m]) for m in METRICS if m in s["items"]} for name, s in scores.items()}


def plot_pareto(cfg: MergeSearchConfig, rows: list[dict], ranked: list[dict], ref_dev: dict, test_est: dict,
                path: Path) -> Path:
    """Medical perplexity (x) against language-gated German IF (y); colour: English IF. Left dev (every trial,
    the front ringed), right test (the re-scored front and the references, with 95% CIs)."""
    from definemed.eval.report import _plt

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    done = [r for r in rows if r["status"] == "done"]
    x = [r["metrics"]["ppl_medical"] for r in done]
    y = [r["metrics"]["if_de_gated"] for r in done]
    c = [r["metrics"]["if_en"] for r in done]
    sc = a.scatter(x, y, c=c, cmap="viridis", vmin=0, vmax=max(c + [0.01]), s=28, alpha=0.8, label="trials")
    a.scatter([r["metrics"]["ppl_medical"] for r in ranked], [r["metrics"]["if_de_gated"] for r in ranked],
              facecolors="none", edgecolors="crimson", s=90, label="Pareto front")
    for name, s in ref_dev.items():
        a.scatter(s["metrics"]["ppl_medical"], s["metrics"]["if_de_gated"], marker="*", s=140, color="black")
        a.annotate(name, (s["metrics"]["ppl_medical"], s["metrics"]["if_de_gated"]), fontsize=8,
                   xytext=(4, 4), textcoords="offset points")
    fig.colorbar(sc, ax=[a, b], label="IF en, prompt-level strict (dev)")
    a.set_title(f"dev: {len(done)} trials")
    for name, est in test_est.items():
        xm, ym = est["ppl_medical"], est["if_de_gated"]
        ref = not name.startswith("trial:")
        b.errorbar(xm["value"], ym["value"], xerr=[[xm["value"] - xm["lo"]], [xm["hi"] - xm["value"]]],
                   yerr=[[ym["value"] - ym["lo"]], [ym["hi"] - ym["value"]]], fmt="*" if ref else "o",
                   color="black" if ref else "crimson", ms=10 if ref else 6, capsize=2, alpha=0.8)
        b.annotate(name.replace("trial:", ""), (xm["value"], ym["value"]), fontsize=7, xytext=(4, 4),
                   textcoords="offset points")
    b.set_title("test: front (re-scored) and references, 95% CI")
    for ax in (a, b):
        ax.set_xlabel("held-out medical perplexity (lower is better)")
        ax.grid(alpha=0.3)
    a.set_ylabel("language-gated German IF (higher is better)")
    a.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def merge_stage_yaml(cfg: MergeSearchConfig, recipe: dict[str, Any], out: Path) -> str:
    from definemed.merge.search.trial import merge_config

    mc = merge_config(cfg, recipe, str(out.parent / "merge-searched"))
    d = mc.model_dump(mode="json", include={"output_dir", "model_a", "model_b", "method", "t", "density", "seed",
                                            "dtype"}, exclude_none=True)
    return ("# the merge stage's config for the recipe merge-search chose (definemed merge --config this-file)\n"
            + yaml.safe_dump(d, sort_keys=False, allow_unicode=True))


def _markdown(cfg: MergeSearchConfig, summary: dict, ranked: list[dict], ref_dev: dict, test_est: dict,
              comparisons: dict) -> str:
    ms = [o.metric for o in cfg.objectives]
    shown = [m for m in METRICS if m in ms] + [m for m in METRICS if m not in ms]
    head = "| model | split | " + " | ".join(LABELS[m] + (" ↓" if m.startswith("ppl_") or m == "answer_tokens"
                                                            else " ↑") for m in shown) + " |"
    sep = "|" + " --- |" * (len(shown) + 2)
    lines = [f"# Merge search: {cfg.model_a} (t = 0) × {cfg.model_b} (t = 1)", "",
             f"{summary['trials']} trials ({summary['done']} scored, {summary['errored']} failed), sampler "
             f"{cfg.sampler.kind}; objectives: " + ", ".join(f"{o.metric} ({o.direction})" for o in cfg.objectives)
             + (("; constraints: " + ", ".join(f"{c.metric} ≤ {c.max_ratio} × instruct parent"
                                                 for c in cfg.constraints)) if cfg.constraints else "") + ".",
             f"Dev: {summary['dev']['prompts']} prompts (asked in English and German), "
             f"{summary['dev']['documents']} documents per perplexity set; test: {summary['test']['prompts']} prompts, "
             f"{summary['test']['documents']} documents per set, never seen by the search.", "",
             *([f"> **{summary['meaningless']}**", ""] if summary.get("meaningless") else []),
             f"**Verdict (test split):** {summary['verdict']}", "",
             "## References and the re-scored front, dev and test side by side", "",
             "Test values with 95% bootstrap CIs over items. Perplexities are token-weighted over documents; IF and "
             "LPR are percentages of prompts.", "", head, sep]
    for name, s in ref_dev.items():
        lines.append(f"| {name} | dev | " + " | ".join(_fmt(m, s["metrics"].get(m)) for m in shown) + " |")
        if name in test_est:
            lines.append(f"| {name} | test | " + " | ".join(_fmt_est(m, test_est[name][m]) for m in shown) + " |")
    for r in ranked[:cfg.rescore_top]:
        name = f"trial:{r['trial_id']}"
        lines.append(f"| {name} (front #{r['front_rank']}) | dev | "
                     + " | ".join(_fmt(m, r["metrics"].get(m)) for m in shown) + " |")
        if name in test_est:
            lines.append(f"| {name} | test | " + " | ".join(_fmt_est(m, test_est[name][m]) for m in shown) + " |")
    lines += ["", "## Against the study's schedule on test", "",
              "Paired differences (candidate − study) over the same test items, 95% bootstrap CI. A candidate "
              "dominates when no objective is worse and at least one is better beyond its CI.", "",
              "| candidate | " + " | ".join(LABELS[m] for m in ms) + " | dominates |", "|" + " --- |" * (len(ms) + 2)]
    for name, c in comparisons.items():
        cells = []
        for m in ms:
            d = c["per_objective"][m]
            mark = " ✓" if d["better_beyond_ci"] else (" ✗" if d["worse"] else " ?" if d.get("unknown") else "")
            cells.append(f"{_fmt_signed(m, d['value'])} [{_fmt_signed(m, d['lo'])}, {_fmt_signed(m, d['hi'])}]{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'**yes**' if c['dominates'] else 'no'} |")
    lines += ["", "✓ better beyond the CI, ✗ worse (point estimate), ? not comparable (one side had nothing to "
              "score, e.g. no German line of 5 words for LPR).", "",
              "## The front on dev", "", "| rank | trial | method | t (self_attn / mlp / default) | density | "
              + " | ".join(LABELS[m] for m in ms) + " |", "|" + " --- |" * (len(ms) + 5)]
    for r in ranked:
        t = r["recipe"]["t"]
        sched = " / ".join(str(t.get(k, "–")) for k in ("self_attn", "mlp", "default"))
        lines.append(f"| {r['front_rank']} | {r['trial_id']} | {r['recipe']['method']} | {sched} | "
                     f"{r['recipe'].get('density', '–')} | " + " | ".join(_fmt(m, r["metrics"].get(m)) for m in ms)
                     + " |")
    lines += ["", "![Pareto front](pareto.png)", "",
              f"Chosen (front #1 on dev): `best/mergekit.yaml` reproduces it with `mergekit-yaml best/mergekit.yaml "
              f"OUT --random-seed 0`; `best/merge.yaml` is the merge stage's config for it."]
    return "\n".join(lines) + "\n"


def _fmt_signed(metric: str, v: float) -> str:
    if v != v:
        return "n/a"
    s = _fmt(metric, abs(v))
    return ("+" if v >= 0 else "−") + s


def write_outputs(cfg: MergeSearchConfig, out: Path, rows: list[dict], ranked: list[dict], ref_dev: dict,
                  ref_test: dict, prep: dict, dev, test) -> dict[str, str]:
    from definemed.merge.search.run import compare

    slim = [{k: v for k, v in r.items() if k != "items"} for r in rows]
    atomic_write_text(out / "trials.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in slim))
    test_est = _test_estimates(ref_test)
    candidates = [n for n in ref_test if n.startswith("trial:")]
    comparisons = {n: compare(cfg, ref_test[n], ref_test["study"]) for n in candidates + ["uniform-0.5"]}
    winners = [n for n in candidates if comparisons[n]["dominates"]]
    verdict = (f"{len(winners)} of {len(candidates)} re-scored front members dominate the study's schedule: "
               + ", ".join(winners) if winners else
               f"none of the {len(candidates)} re-scored front members dominates the study's schedule on test "
               "(no objective worse and one better beyond its CI); the front is shown below")
    best = ranked[0]
    bdir = out / "best"
    bdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(bdir / "mergekit.yaml", best["mergekit_yaml"] + ("\n" if not best["mergekit_yaml"]
                                                                       .endswith("\n") else ""))
    atomic_write_text(bdir / "merge.yaml", merge_stage_yaml(cfg, best["recipe"], out))
    summary = {
        "trials": len(rows), "done": sum(r["status"] == "done" for r in rows),
        "errored": sum(r["status"] == "error" for r in rows),
        "dev": {"prompts": len(dev.items), "documents": min(len(v) for v in dev.documents.values())},
        "test": {"prompts": len(test.items), "documents": min(len(v) for v in test.documents.values())},
        "verdict": verdict, "dominating": winners,
        "meaningless": MEANINGLESS if any(is_meaningless_model(r) for r in (cfg.model_a, cfg.model_b)) else None,
    }
    plot = plot_pareto(cfg, rows, ranked, ref_dev, test_est, out / "pareto.png")
    atomic_write_text(out / "report.md", _markdown(cfg, summary, ranked, ref_dev, test_est, comparisons))
    atomic_write_json(out / "results.json", {
        **summary, "objectives": [o.model_dump() for o in cfg.objectives],
        "front": [{"rank": r["front_rank"], "trial_id": r["trial_id"], "recipe": r["recipe"],
                   "dev": r["metrics"]} for r in ranked],
        "dev": {n: s["metrics"] for n, s in ref_dev.items()}, "test": test_est, "comparisons": comparisons,
        "best": {"trial_id": best["trial_id"], "recipe": best["recipe"], "dev": best["metrics"],
                 "test": test_est.get(f"trial:{best['trial_id']}")},
        "splits": {"dev": dev.describe(), "test": test.describe()}, "parents": prep})
    return {"report": str(out / "report.md"), "results": str(out / "results.json"), "pareto_plot": str(plot),
            "trials": str(out / "trials.jsonl"), "best_mergekit": str(bdir / "mergekit.yaml"),
            "best_merge_config": str(bdir / "merge.yaml")}
