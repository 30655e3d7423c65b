"""The merge frontier: uniform SLERP between two evaluated models, scored like any other model.

The study describes SLERP as a trade: medical knowledge from the CPT model against the general abilities of the
model it started from. Merging at t = 0, 0.25, ..., 1 and scoring every point on the medical and the general
perplexity sets (and MC) shows that trade as a curve; the study's layer-wise schedule (the merge stage's model)
and the parents are marked on it. t = 0 is model_a and t = 1 model_b by SLERP's definition, so those points reuse
the parents' scores instead of merging.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from definemed.config import StrictModel

log = logging.getLogger(__name__)


class FrontierConfig(StrictModel):
    model_a: str = Field(description="eval model at t = 0 (the model CPT started from)")
    model_b: str = Field(description="eval model at t = 1 (the CPT model)")
    t: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=2)
    marked: list[str] = Field(default_factory=list, description="further eval models to mark on the plot, e.g. "
                                                                "the merge stage's layer-wise merge")
    backends: list[Literal["vllm", "transformers"]] = Field(
        default_factory=lambda: ["transformers"], min_length=1,
        description="perplexity backends for the merged points (the parents use the perplexity section's); the "
                    "first also scores their MC items")
    mc: bool = Field(True, description="also score the merged points on the MC benchmarks")
    instructions: bool = Field(True, description="also ask the merged points the instruction sets (when the eval "
                                                 "has an `instructions` section), through a local engine each")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # merged weights; None = model_a's dtype
    keep_models: bool = Field(False, description="keep the merged weights after scoring (they are large)")

    @field_validator("t")
    @classmethod
    def _t_range(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not 0.0 <= x <= 1.0]
        if bad:
            raise ValueError(f"t must lie in [0, 1], got {bad[0]}")
        return sorted(set(v))


def point_name(t: float) -> str:
    return f"slerp-t{t:g}"


def build_points(cfg: FrontierConfig, paths: dict[str, str], out: Path) -> dict[str, str]:
    """Merge model_a and model_b at every interior t (a Ray task each, resumable); name -> model dir."""
    from tqdm import tqdm

    from definemed.merge.config import MergeStageConfig
    from definemed.merge.run import run as run_merge

    points = {}
    for t in tqdm([x for x in cfg.t if 0.0 < x < 1.0], desc="frontier merges", unit="merge"):
        mcfg = MergeStageConfig(output_dir=str(out / point_name(t)), model_a=paths[cfg.model_a],
                                model_b=paths[cfg.model_b], method="slerp", t={"default": t}, dtype=cfg.dtype)
        points[point_name(t)] = run_merge(mcfg)["model"]
    return points


#: Instruction-following columns of a frontier row: (row key, instruction set language, metric of score_set).
INSTRUCTION_COLUMNS = (("if_en", "en", "prompt_strict"), ("if_de_gated", "de", "gated"), ("lpr_de", "de", "lpr"))


def frontier_rows(cfg: FrontierConfig, ppl_rows: list[dict], mc_preds: list[dict] | None,
                  instr_rows: list[dict] | None = None) -> list[dict]:
    """One row per plotted point: its t (None for marked models), perplexity per set, MC accuracy over all MC
    items pooled, and, where asked, instruction following: English prompt-level strict accuracy (what the instruct
    parent can do), German language-gated accuracy, and German LPR.

    Perplexity is the transformers backend's when present (every point has it), else the first backend's."""
    ppl: dict[tuple[str, str], dict] = {}
    for r in ppl_rows:
        key = (r["model"], r["set"])
        if key not in ppl or r["backend"] == "transformers":
            ppl[key] = r
    correct: dict[str, list[float]] = {}
    for p in mc_preds or []:
        correct.setdefault(p["model"], []).append(1.0 if p["correct"] else 0.0)
    acc = {m: sum(v) / len(v) for m, v in correct.items()}
    sets = sorted({s for _, s in ppl})
    rows = []

    instr: dict[tuple[str, str], dict] = {}
    for r in instr_rows or []:
        instr.setdefault((r["model"], r["lang"]), r)  # the first set of each language

    def metric(model: str, lang: str, key: str) -> float:
        d = (instr.get((model, lang)) or {}).get(key)
        return d["value"] if d else math.nan

    def row(model: str, t: float | None, kind: str) -> dict:
        return {"model": model, "t": t, "kind": kind,
                **{f"ppl_{s}": ppl[(model, s)]["value"] if (model, s) in ppl else math.nan for s in sets},
                **{f"ppl_{s}_lo": ppl[(model, s)]["lo"] if (model, s) in ppl else math.nan for s in sets},
                **{f"ppl_{s}_hi": ppl[(model, s)]["hi"] if (model, s) in ppl else math.nan for s in sets},
                "mc_accuracy": acc.get(model, math.nan),
                **{col: metric(model, lang, key) for col, lang, key in INSTRUCTION_COLUMNS}}

    for t in cfg.t:
        model = cfg.model_a if t == 0.0 else cfg.model_b if t == 1.0 else point_name(t)
        rows.append(row(model, t, "uniform"))
    for m in cfg.marked:
        rows.append(row(m, None, "marked"))
    return rows


def _draw(ax, rows: list[dict], xk: str, yk: str, x_label: str, y_label: str) -> None:
    """One panel: the uniform-t curve, parents and marked models labelled."""
    uni = [r for r in rows if r["kind"] == "uniform" and not math.isnan(r[xk])]
    ax.plot([r[xk] for r in uni], [r[yk] for r in uni], "-o", color="tab:blue", label="SLERP, uniform t")
    ends = [r for r in uni if r["t"] in (0.0, 1.0)]
    ax.scatter([r[xk] for r in ends], [r[yk] for r in ends], marker="s", s=70, color="tab:blue", zorder=3,
               label="parents (t = 0, t = 1)")
    for r in uni:
        ax.annotate(f"t={r['t']:g}" + (f" ({r['model']})" if r["t"] in (0.0, 1.0) else ""), (r[xk], r[yk]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    for r in rows:
        if r["kind"] == "marked" and not math.isnan(r[xk]):
            # no CI bars: the points are scored on the same documents, and unpaired CIs would hide the trade
            ax.plot(r[xk], r[yk], "*", ms=14, label=r["model"])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.legend(fontsize=8)


def plot_frontier(rows: list[dict], path: Path, x_set: str = "general", y_set: str = "medical",
                  title: str = "Merge frontier",
                  panels: list[tuple[str, str]] | None = None) -> Path:
    """Medical perplexity (lower is better) against general perplexity, or, with `panels` ([(row column, axis
    label)]), against each of those columns side by side (e.g. instruction following, higher is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yk = f"ppl_{y_set}"
    panels = panels or [(f"ppl_{x_set}", f"{x_set} German perplexity (lower is better)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (xk, label) in zip(axes[0], panels):
        _draw(ax, rows, xk, yk, label, f"held-out {y_set} perplexity (lower is better)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cleanup(points: dict[str, str]) -> None:
    """Drop the merged points' directories once scored (their scores are cached; a rerun merges again)."""
    import shutil

    for p in points.values():
        shutil.rmtree(Path(p).parent, ignore_errors=True)
