"""Retention: how much of its teacher a distilled student keeps, metric by metric, and whether knowledge
distillation (KD) beat plain cross-entropy training (CE-only) of the same student on the same tokens.

Retention of a student on a metric is student ÷ teacher, on the same items, so 1.0 means it kept everything and
less than 1 means it lost some:
- higher-is-better metrics (instruction following, LPR, MC accuracy, QA EM and F1): metric_student ÷
  metric_teacher;
- held-out perplexity (lower is better): ppl_teacher ÷ ppl_student. Both are token-weighted,
  exp(summed NLL / predicted tokens), so the ratio is exp(CE_teacher − CE_student): the geometric-mean ratio of
  the probability the student gives each held-out token to the teacher's. It needs a shared tokenizer (a
  distilled student has its teacher's); the report says when the token counts differ.
Each ratio has a 95% paired bootstrap CI over items (documents for perplexity, prompts, MC items, QA items):
every resample draws the same items for teacher and student (definemed.eval.stats.paired_ratio).

KD against the control: the difference KD − CE-only in held-out medical perplexity (token-weighted, per
document) and in QA F1, each with a paired bootstrap CI over the same resampled documents / items; the verdict
says whether the CI excludes 0 and which way.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from definemed.config import StrictModel


class ControlConfig(StrictModel):
    """The student distilled with KD and the same student trained CE-only on the same tokens (eval model names)."""

    kd: str
    ce: str

    @model_validator(mode="after")
    def _distinct(self) -> "ControlConfig":
        if self.kd == self.ce:
            raise ValueError(f"kd and ce must be different models (both {self.kd!r})")
        return self


class RetentionConfig(StrictModel):
    """Student ÷ teacher on every metric of the run, parameter counts, and KD against its CE-only control."""

    teacher: str = Field(description="eval model name of the teacher")
    students: list[str] = Field(min_length=1, description="eval model names of the students")
    control: ControlConfig | None = Field(None, description="KD student and its CE-only control: the paired "
                                                            "bootstrap comparison")
    perplexity_set: str = Field("medical", description="the perplexity set that is the held-out medical set "
                                                       "(the KD-vs-CE perplexity comparison)")
    backend: Literal["vllm", "transformers"] | None = Field(
        None, description="perplexity backend whose NLLs are compared (default: transformers when scored)")

    @model_validator(mode="after")
    def _distinct(self) -> "RetentionConfig":
        if len(set(self.students)) != len(self.students):
            raise ValueError("students: a model is listed twice")
        if self.teacher in self.students:
            raise ValueError(f"students: the teacher {self.teacher!r} cannot be its own student")
        return self

    def models(self) -> list[str]:
        extra = [m for m in ((self.control.kd, self.control.ce) if self.control else ()) if m not in self.students]
        return [self.teacher, *self.students, *extra]


# ---------------------------------------------------------------- statistics on per-item rows
def ppl_stat(rows: np.ndarray) -> float:
    """Token-weighted perplexity of document rows [summed NLL, predicted tokens]."""
    return float(math.exp(rows[:, 0].sum() / rows[:, 1].sum())) if len(rows) and rows[:, 1].sum() else math.nan


def mean_stat(rows: np.ndarray) -> float:
    """Mean over items that have a value (nan rows, e.g. an answer LPR skips, are left out)."""
    v = rows[:, 0][~np.isnan(rows[:, 0])]
    return float(v.mean()) if len(v) else math.nan


def ratio_row(metric: str, label: str, teacher_rows, student_rows, lower_better: bool, n_boot: int,
              seed: int) -> dict[str, Any]:
    """Retention of one student on one metric: student ÷ teacher (teacher ÷ student for lower-is-better
    perplexity), with a paired bootstrap CI."""
    from definemed.eval.stats import paired_ratio

    stat = ppl_stat if lower_better else mean_stat
    t, s = np.asarray(teacher_rows, dtype=float), np.asarray(student_rows, dtype=float)
    t, s = t.reshape(len(t), -1), s.reshape(len(s), -1)
    num, den = (t, s) if lower_better else (s, t)
    est = paired_ratio(num, den, stat=stat, n_boot=n_boot, seed=seed, what=metric)
    return {"metric": metric, "label": label, "teacher_value": stat(t), "student_value": stat(s),
            "lower_better": lower_better, "retention": est.as_dict(), "n": len(t)}


def verdict(diff: dict, lower_better: bool, a: str = "KD", b: str = "CE-only") -> str:
    """Plain words for a paired difference a − b: whether its CI excludes 0, and which way."""
    lo, hi = diff.get("lo", math.nan), diff.get("hi", math.nan)
    if math.isnan(lo) or math.isnan(hi):
        return "no verdict (no CI)"
    a_better = hi < 0 if lower_better else lo > 0
    b_better = lo > 0 if lower_better else hi < 0
    if a_better:
        return f"{a} beats {b} (the 95% CI excludes 0)"
    if b_better:
        return f"{a} does not beat {b}: {b} is better (the 95% CI excludes 0)"
    return f"{a} does not beat {b} (the 95% CI includes 0)"


def difference_row(metric: str, label: str, kd_rows, ce_rows, lower_better: bool, n_boot: int,
                   seed: int) -> dict[str, Any]:
    from definemed.eval.stats import paired_difference

    stat = ppl_stat if lower_better else mean_stat
    d = paired_difference(kd_rows, ce_rows, stat=stat, n_boot=n_boot, seed=seed, what=metric).as_dict()
    k, c = np.asarray(kd_rows, dtype=float), np.asarray(ce_rows, dtype=float)
    return {"metric": metric, "label": label, "kd_value": stat(k.reshape(len(k), -1)),
            "ce_value": stat(c.reshape(len(c), -1)), "difference": d, "lower_better": lower_better,
            "verdict": verdict(d, lower_better), "n": len(k)}


# ---------------------------------------------------------------- per-item rows of each metric in a run
Rows = dict[str, list[list[float]]]  # model -> one row per item


def perplexity_rows(per_doc: dict, set_name: str, backend: str) -> Rows:
    """model -> [summed NLL, predicted tokens] per document of one set (the same documents, in the same order,
    for every model: eval's perplexity scores one document list)."""
    return {m: [[nll, n] for nll, n in zip(sets[set_name]["nll"][backend], sets[set_name]["targets"])]
            for m, sets in per_doc.items() if set_name in sets and backend in sets[set_name]["nll"]}


def instruction_rows(instr: dict) -> dict[str, tuple[str, Rows]]:
    """metric -> (label, model -> per-prompt rows): prompt-level strict on English sets; language-gated and LPR
    (nan where LPR skips the answer) on the others."""
    out: dict[str, tuple[str, Rows]] = {}
    for r in instr["rows"]:
        if r.get("point"):
            continue
        s, prompts = r["set"], r["prompts"]
        if r["lang"] == "en":
            out.setdefault(f"if_{s}", (f"IF {s}, prompt-level strict", {}))[1][r["model"]] = [
                [float(all(p["strict"]))] for p in prompts]
        else:
            out.setdefault(f"if_{s}_gated", (f"IF {s}, language-gated", {}))[1][r["model"]] = [
                [float(all(p["strict"]) and bool(p["language_pass"]))] for p in prompts]
            out.setdefault(f"lpr_{s}", (f"LPR {s}", {}))[1][r["model"]] = [
                [math.nan if p.get("language_skipped") else float(bool(p["language_pass"]))] for p in prompts]
    return out


def mc_rows(preds: Sequence[dict]) -> dict[str, tuple[str, Rows]]:
    """metric -> (label, model -> per-item correct), per benchmark, items in one order for every model."""
    by: dict[str, dict[str, dict[str, float]]] = {}
    for p in preds:
        by.setdefault(p["benchmark"], {}).setdefault(p["model"], {})[p["item_id"]] = float(p["correct"])
    out = {}
    for bench, models in by.items():
        ids = sorted(set.intersection(*(set(v) for v in models.values())))
        out[f"mc_{bench}"] = (f"MC {bench}, accuracy", {m: [[v[i]] for i in ids] for m, v in models.items()})
    return out


def qa_rows(qa: dict) -> dict[str, tuple[str, Rows]]:
    """metric -> (label, model -> per-item EM or F1) for every QA mode."""
    out: dict[str, tuple[str, Rows]] = {}
    for r in qa["rows"]:
        mode = r["mode"].replace("_", "-")
        for k in ("em", "f1"):
            out.setdefault(f"qa_{r['mode']}_{k}", (f"QA {k.upper()}, {mode}", {}))[1][r["model"]] = [
                [p[k]] for p in r["items"]]
    return out


# ---------------------------------------------------------------- parameters
def count_parameters(model_dir: str | Path) -> int | None:
    """Parameters stored in a model directory's safetensors files (headers only; a tied lm_head stored beside
    the embeddings counts once). None when the directory has none (an endpoint, a hub id not on disk)."""
    import json

    from definemed.merge.validate import tensor_shapes

    shapes = tensor_shapes(str(model_dir))
    if not shapes:
        return None
    cfg_file = Path(model_dir) / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    tied = cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings", False))
    n = 0
    for name, shape in shapes.items():
        if tied and name.endswith("lm_head.weight") and any(k.endswith("embed_tokens.weight") for k in shapes):
            continue
        n += int(np.prod(shape)) if shape else 1
    return n


def parameter_rows(teacher: str, students: Sequence[str], dirs: dict[str, str | None]) -> list[dict]:
    counts = {m: (count_parameters(d) if d else None) for m, d in dirs.items()}
    t = counts.get(teacher)
    rows = [{"model": teacher, "role": "teacher", "parameters": t, "reduction": 0.0 if t else None}]
    for s in students:
        n = counts.get(s)
        rows.append({"model": s, "role": "student", "parameters": n,
                     "reduction": (1 - n / t) if n is not None and t else None})
    return rows


# ---------------------------------------------------------------- the retention table of one run
def compute(cfg: RetentionConfig, *, per_doc: dict | None, instr: dict | None, mc_preds: Sequence[dict] | None,
            mc_table: Sequence[dict] | None, qa: dict | None, model_dirs: dict[str, str | None], n_boot: int,
            seed: int) -> dict[str, Any]:
    """Everything the retention section reports, from the per-item results of one eval run."""
    metrics: list[tuple[str, str, Rows, bool]] = []  # (metric, label, rows, lower_better)
    notes: list[str] = []
    backend = None
    if per_doc:
        scored = {b for sets in per_doc.values() for st in sets.values() for b in st["nll"]}
        backend = cfg.backend or ("transformers" if "transformers" in scored else sorted(scored)[0])
        for set_name in dict.fromkeys(s for sets in per_doc.values() for s in sets):
            rows = perplexity_rows(per_doc, set_name, backend)
            metrics.append((f"ppl_{set_name}", f"perplexity {set_name} ({backend})", rows, True))
            targets = {m: [r[1] for r in v] for m, v in rows.items()}
            if cfg.teacher in targets and any(targets.get(s) not in (None, targets[cfg.teacher])
                                              for s in cfg.students):
                notes.append(f"perplexity {set_name}: a student's token counts differ from the teacher's (another "
                             "tokenizer), so the ratio compares different token units")
    for source in ((instruction_rows(instr) if instr else {}), (mc_rows(mc_preds) if mc_preds else {}),
                   (qa_rows(qa) if qa else {})):
        metrics += [(m, label, rows, False) for m, (label, rows) in source.items()]
    rows_out = []
    for metric, label, rows, lower in metrics:
        if cfg.teacher not in rows:
            continue
        for s in cfg.students:
            if s in rows:
                rows_out.append({"student": s, **ratio_row(metric, label, rows[cfg.teacher], rows[s], lower,
                                                           n_boot, seed)})
    if mc_table:
        notes += _mc_chance_notes(mc_table, cfg.models())
    kd_vs_ce = []
    if cfg.control is not None:
        kd, ce = cfg.control.kd, cfg.control.ce
        wanted = [(f"ppl_{cfg.perplexity_set}", True)] + [(m, False) for m, *_ in metrics
                                                          if m.startswith("qa_") and m.endswith("_f1")]
        by_metric = {m: (label, rows, lower) for m, label, rows, lower in metrics}
        for metric, lower in wanted:
            if metric in by_metric and kd in by_metric[metric][1] and ce in by_metric[metric][1]:
                label, rows, _ = by_metric[metric]
                kd_vs_ce.append(difference_row(metric, label, rows[kd], rows[ce], lower, n_boot, seed))
    return {"teacher": cfg.teacher, "students": cfg.students,
            "control": cfg.control.model_dump() if cfg.control else None, "backend": backend,
            "perplexity_set": cfg.perplexity_set, "rows": rows_out, "notes": notes,
            "parameters": parameter_rows(cfg.teacher, cfg.students, model_dirs), "kd_vs_ce": kd_vs_ce}


def _mc_chance_notes(table: Sequence[dict], models: Sequence[str]) -> list[str]:
    """A note per MC benchmark whose every retention model is at chance (the report's chance_note rule): a
    ratio of two guesses says nothing."""
    from definemed.eval.report import chance_note

    notes = []
    for bench in sorted({r["benchmark"] for r in table}):
        rows = [r for r in table if r["benchmark"] == bench and r["model"] in models]
        if rows and chance_note(rows):
            notes.append(f"MC {bench}: every model's overall accuracy has chance inside its 95% CI, so its "
                         "retention compares guesses")
    return notes


def write_json(result: dict, path: Path) -> Path:
    """The retention table as JSON (for the README and for comparing runs)."""
    from definemed.io import atomic_write_json

    atomic_write_json(path, result)
    return path

