"""Words into tokens per model family, with measured fertility, and so into CPT steps and GPU-hours.

The study's FineMed-de has 5.1B words (definemed.corpus.filter.STUDY); what that costs depends on the tokenizer.
For every family in definemed.tokenizers.families the plan takes the fertility that the `tokenizers` stage measured
on the chosen set (by default the table committed in docs/tokenizers/ with its lineage), multiplies the words by
it (and by its 95% CI), and divides by the cpt stage's tokens per step; GPU-hours use the cpt stage's throughput
figure. A family without a measured tokenizer (Qwen2.5: none offline) gets no number: the plan says "not measured"
and why, and never falls back to a default fertility.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from definemed.config import ConfigError, StrictModel
from definemed.plan.project import Throughput, _num, gpu_hours, hours, project

COMMITTED_TABLE = Path(__file__).resolve().parents[2] / "docs" / "tokenizers"


class TokenBudget(StrictModel):
    """How many words continued pre-training reads, and which measured fertility turns them into tokens.

    `words` (with `words_source`) states a count; `words_from` reads a measured one: a filter stage output (its
    stats.json: FineMed-de's words) or a tokenizers stage output (the words of `set`, when the set was read
    whole). Neither: the study's 5.1B words of FineMed-de. `fertility`: a tokenizers stage output directory (or its
    fertility.json); default: the table committed under docs/tokenizers/."""

    words: float | None = Field(None, gt=0)
    words_source: str | None = None
    words_from: str | None = None
    fertility: str | None = None
    set: str = "finemed_de"

    @model_validator(mode="after")
    def _one_source(self):
        if self.words is not None and self.words_from is not None:
            raise ValueError("give words or words_from, not both")
        if self.words is not None and not (self.words_source or "").strip():
            raise ValueError("words needs words_source: where the count comes from")
        return self


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} not found") from None
    except json.JSONDecodeError:
        raise ConfigError(f"{what}: {path} is not valid JSON") from None


def load_table(where: str | None) -> tuple[dict[str, Any], str]:
    """(the tokenizers stage's fertility.json, a line saying where it comes from)."""
    from definemed.tokenizers.report import TABLE_JSON

    p = Path(where) if where else COMMITTED_TABLE
    f = p if p.suffix == ".json" else p / TABLE_JSON
    doc = _read_json(f, "tokens.fertility")
    lin = f.parent / "lineage.json"
    origin = "committed table" if not where else "tokenizers output"
    if lin.exists():
        m = json.loads(lin.read_text(encoding="utf-8"))
        rev = (m.get("git_revision") or "")[:10]
        origin += (f", measured {str(m.get('created_utc', '?'))[:10]}" + (f" at {rev}" if rev else "")
                   + f"; lineage {_shown(lin)}")
    else:
        origin += ", no lineage.json beside it"
    return doc, f"{_shown(f)} ({origin})"


def _shown(p: Path) -> str:
    """A path as the user would type it: relative to the working directory when it lies below it."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _words(b: TokenBudget, table: dict[str, Any]) -> tuple[float, str]:
    if b.words is not None:
        return b.words, b.words_source or ""
    if b.words_from is None:
        from definemed.corpus.filter import STUDY

        return STUDY["filtered"]["words"], "the DeFineMed study's FineMed-de (definemed.corpus.filter.STUDY)"
    p = Path(b.words_from)
    if (p / "stats.json").exists() or p.name == "stats.json":
        f = p if p.name == "stats.json" else p / "stats.json"
        w = _read_json(f, "tokens.words_from").get("filtered", {}).get("words")
        if not w:
            raise ConfigError(f"tokens.words_from: {f} has no filtered.words")
        return float(w), f"measured by the filter stage ({f}, definemed.text.words)"
    doc, where = load_table(str(p))
    s = next((s for s in doc["sets"] if s["name"] == b.set), None)
    if s is None or s.get("limit") or s.get("where"):
        raise ConfigError(f"tokens.words_from: {where} did not read set '{b.set}' whole; its words are no corpus count")
    return float(s["words"]), f"measured by the tokenizers stage ({where}, set {b.set})"


@dataclass
class FamilyTokens:
    key: str
    label: str
    tokenizer: str | None = None  # the measured tokenizer's name
    fertility: float | None = None
    fertility_lo: float | None = None
    fertility_hi: float | None = None
    tokens: float | None = None
    tokens_lo: float | None = None
    tokens_hi: float | None = None
    steps: int | None = None
    wall_h: float | None = None
    gpu_h: float | None = None
    configured: bool = False  # the cpt stage trains a model of this family
    why: str = ""  # not measured: why

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TokenPlan:
    words: float
    words_source: str
    table: str
    set_line: str
    families: list[FamilyTokens] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"words": self.words, "words_source": self.words_source, "fertility_table": self.table,
                "set": self.set_line, "families": [f.to_dict() for f in self.families], "notes": self.notes}

    def lines(self) -> list[str]:
        if not self.families:
            return ["tokens per model family: not computed: " + "; ".join(self.notes)]
        out = ["tokens per model family (words x measured fertility; CPT steps and GPU-h for one pass over them):",
               f"  words: {_num(self.words)} ({self.words_source})",
               f"  fertility: {self.set_line}", f"    from {self.table}"]
        head = ("family", "tokenizer", "fertility [95% CI]", "tokens [95% CI]", "CPT steps", "wall", "GPU-h")
        body = []
        for f in self.families:
            label = f.label + (" (cpt model)" if f.configured else "")
            if f.fertility is None:
                body.append((label, "not measured", "-", "-", "-", "-", "-"))
                continue
            body.append((label, f.tokenizer or "", f"{f.fertility:.2f} [{f.fertility_lo:.2f}, {f.fertility_hi:.2f}]",
                         f"{_num(f.tokens)} [{_num(f.tokens_lo)}, {_num(f.tokens_hi)}]",
                         "-" if f.steps is None else f"{f.steps:,}",
                         "-" if f.wall_h is None else hours(f.wall_h),
                         "-" if f.gpu_h is None else gpu_hours(f.gpu_h).replace(" GPU-h", "")))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        fmt = lambda cells: "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out += [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        out += [f"  {f.label}: not measured: {f.why}" for f in self.families if f.fertility is None]
        out += [f"  {n}" for n in self.notes]
        return out


def _measured_row(doc: dict[str, Any], key: str, set_name: str, source: str | None) -> dict[str, Any] | None:
    rows = [r for r in doc["rows"] if r["set"] == set_name and r["family"] == key and not r["tiny"]]
    by_source = {t["name"]: t.get("source") for t in doc["tokenizers"]}
    rows.sort(key=lambda r: by_source.get(r["tokenizer"]) != source)  # the family's own offline source first
    return rows[0] if rows else None


def token_plan(budget: TokenBudget, cpt: tuple[Any, list, dict[str, int], Throughput | None] | None) -> TokenPlan:
    """`cpt`: (cpt config, its requests, units the cluster holds, its throughput figure), or None when the plan
    has no cpt stage (tokens only, no steps or GPU-hours)."""
    from definemed.tokenizers.families import FAMILIES, family_of
    from definemed.tokenizers.report import TABLE_JSON

    if budget.fertility is None and not (COMMITTED_TABLE / TABLE_JSON).exists():
        return TokenPlan(0.0, "", "", "", notes=[f"no measured fertility table ({COMMITTED_TABLE} is not there): run "
                                                 "`definemed tokenizers` and set tokens.fertility to its output_dir"])
    doc, where = load_table(budget.fertility)
    words, words_source = _words(budget, doc)
    s = next((s for s in doc["sets"] if s["name"] == budget.set), None)
    if s is None:
        raise ConfigError(f"tokens.set: {where} has no set '{budget.set}' (it has "
                          f"{', '.join(x['name'] for x in doc['sets'])})")
    set_line = (f"set {s['name']}: {s['description']} ({s['texts']:,} texts, {s['words']:,} words"
                + (f", first {s['limit']:,}" if s.get("limit") else "") + ")")
    cfg, requests, units, thr = cpt if cpt is not None else (None, [], {}, None)
    fam_cpt = family_of(getattr(cfg, "model", None)) if cfg is not None else None
    plan = TokenPlan(words, words_source, where, set_line)
    for key, fam in FAMILIES.items():
        ft = FamilyTokens(key, fam.label, configured=fam_cpt is not None and fam_cpt.key == key)
        row = _measured_row(doc, key, budget.set, fam.measured_by)
        if row is None:
            ft.why = (fam.note or f"no {fam.label} tokenizer in the table") + "; the plan gives no tokens, steps or " \
                     "GPU-hours for it rather than assume a fertility"
            plan.families.append(ft)
            continue
        ft.tokenizer = row["tokenizer"]
        ft.fertility, ft.fertility_lo, ft.fertility_hi = row["fertility"], row["fertility_lo"], row["fertility_hi"]
        ft.tokens, ft.tokens_lo, ft.tokens_hi = (words * row["fertility"], words * row["fertility_lo"],
                                                 words * row["fertility_hi"])
        if cfg is not None:
            ft.steps = math.ceil(ft.tokens / cfg.train.global_batch_tokens)
            if thr is not None and thr.rate is not None and requests:
                t = Throughput(request=thr.request, work=ft.tokens, unit="tokens", rate=thr.rate, per=thr.per,
                               startup_h=thr.startup_h, source=thr.source)
                p = project("cpt", cfg, requests, units, t)
                if p is not None and not math.isnan(p.wall_h):
                    ft.wall_h, ft.gpu_h = p.wall_h, p.gpu_h
        plan.families.append(ft)
    if cfg is not None:
        plan.notes.append(f"CPT steps: tokens / {cfg.train.global_batch_tokens:,} tokens per step (cpt "
                          "global_batch_tokens)")
        if thr is not None and thr.rate is not None:
            gpus = sum(units.get(r.key, r.min_units) * r.gpus_per_unit for r in requests)
            plan.notes.append(f"wall and GPU-h: at the cpt stage's rate, {thr.rate:,.4g} {thr.unit}/s per {thr.per} "
                              f"on {gpus:g} GPUs ({thr.source}); that rate is the configured model's "
                              f"({cfg.model}), so the rows differ by tokenizer only: a model of another size trains "
                              "at another rate")
        else:
            plan.notes.append("wall and GPU-h: no cpt throughput rate given (throughput.cpt.rate)")
        configured = next((f for f in plan.families if f.configured), None)
        given = cfg.train.max_steps * cfg.train.global_batch_tokens
        if configured is None:
            plan.notes.append(f"the cpt model ({cfg.model}) belongs to no known family: its tokens are not projected")
        elif configured.fertility is None:
            plan.notes.append(f"the cpt model ({cfg.model}) is {configured.label}, not measured: its config's "
                              f"{cfg.train.max_steps:,} steps ({_num(given)} tokens) cannot be checked against the "
                              "corpus")
        else:
            plan.notes.append(f"the cpt model ({cfg.model}) is {configured.label}: its config's "
                              f"{cfg.train.max_steps:,} steps ({_num(given)} tokens) are "
                              f"{given / configured.tokens:.0%} of one pass over the words "
                              f"({configured.steps:,} steps)")
    return plan
