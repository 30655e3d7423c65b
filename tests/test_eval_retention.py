"""Retention of distilled students: the formula on hand examples, the paired bootstrap of KD against CE-only on
constructed documents (a CI that must exclude 0 and one that must include it), parameter counts from safetensors,
the whole table from a run's per-item results, and config errors that exit 2 with one line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from definemed.eval import retention
from definemed.eval.stats import bootstrap_ci, paired_difference


def test_retention_formula_on_hand_examples():
    # perplexity: teacher 200 nats over 100 tokens (ppl e^2), student 230 over 100 (ppl e^2.3);
    # retention = ppl_teacher / ppl_student = exp(CE_t - CE_s) = e^-0.3 = 0.7408: < 1, the student is worse
    t = [[120.0, 60], [80.0, 40]]
    s = [[138.0, 60], [92.0, 40]]
    r = retention.ratio_row("ppl_medical", "perplexity", t, s, lower_better=True, n_boot=200, seed=0)
    assert r["teacher_value"] == pytest.approx(math.e ** 2) and r["student_value"] == pytest.approx(math.e ** 2.3)
    assert r["retention"]["value"] == pytest.approx(math.exp(-0.3))
    # a higher-is-better metric: student 2/4 correct against the teacher's 3/4 -> 0.5 / 0.75 = 2/3
    r = retention.ratio_row("if_en", "IF en", [[1.0], [1.0], [1.0], [0.0]], [[1.0], [0.0], [1.0], [0.0]],
                            lower_better=False, n_boot=200, seed=0)
    assert r["retention"]["value"] == pytest.approx(2 / 3)
    # a student that equals its teacher keeps everything, with a CI of exactly 1
    r = retention.ratio_row("ppl_medical", "perplexity", t, t, lower_better=True, n_boot=200, seed=0)
    assert (r["retention"]["value"], r["retention"]["lo"], r["retention"]["hi"]) == pytest.approx((1, 1, 1))
    # LPR rows that LPR skips (nan) are left out of each model's mean: student 1/2 vs teacher 2/2
    r = retention.ratio_row("lpr_de", "LPR", [[1.0], [1.0], [math.nan]], [[1.0], [0.0], [math.nan]],
                            lower_better=False, n_boot=200, seed=0)
    assert r["retention"]["value"] == pytest.approx(0.5)


def _documents(n: int = 30, seed: int = 1) -> np.ndarray:
    """Held-out documents of very different difficulty: summed NLL 1.2-4.0 nats per token, 80-300 tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(80, 300, n).astype(float)
    return np.column_stack([tokens * rng.uniform(1.2, 4.0, n), tokens])


def test_paired_bootstrap_ci_excludes_zero_when_kd_is_better_on_every_document():
    ce = _documents()
    kd = ce.copy()
    kd[:, 0] -= 0.03 * kd[:, 1]  # 0.03 nats per token better on every document: small against the spread
    d = retention.difference_row("ppl_medical", "perplexity", kd, ce, lower_better=True, n_boot=1000, seed=0)
    assert d["difference"]["hi"] < 0 and d["verdict"].startswith("KD beats CE-only")
    # the same gap is invisible without pairing: the two models' own CIs overlap widely
    a = bootstrap_ci(kd, stat=retention.ppl_stat, n_boot=1000)
    b = bootstrap_ci(ce, stat=retention.ppl_stat, n_boot=1000)
    assert a.hi > b.lo


def test_paired_bootstrap_ci_includes_zero_when_kd_only_trades_documents():
    ce = _documents()
    kd = ce.copy()
    sign = np.where(np.arange(len(ce)) % 2 == 0, 1.0, -1.0)
    kd[:, 0] += sign * 0.2 * kd[:, 1]  # better on half the documents, worse on the other half
    d = retention.difference_row("ppl_medical", "perplexity", kd, ce, lower_better=True, n_boot=1000, seed=0)
    assert d["difference"]["lo"] < 0 < d["difference"]["hi"]
    assert d["verdict"] == "KD does not beat CE-only (the 95% CI includes 0)"
    # QA F1 (higher is better): the control better on every item -> the verdict says so
    f1 = retention.difference_row("qa_zero_shot_f1", "F1", [[0.2]] * 10 + [[0.5]] * 10, [[0.4]] * 10 + [[0.7]] * 10,
                                  lower_better=False, n_boot=500, seed=0)
    assert f1["verdict"].startswith("KD does not beat CE-only: CE-only is better")
    with pytest.raises(ValueError, match="ppl_medical: the two models were scored on different items"):
        paired_difference(kd, ce[:-1], what="ppl_medical")


def test_parameters_are_counted_from_safetensors(tiny_qwen2):
    import torch
    from transformers import AutoModelForCausalLM

    from definemed.distill.surgery import count_parameters

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    assert retention.count_parameters(tiny_qwen2) == count_parameters(model)
    rows = retention.parameter_rows("t", ["s"], {"t": tiny_qwen2, "s": None})
    assert rows[0]["parameters"] == count_parameters(model) and rows[1]["parameters"] is None


def _run_results(n_docs: int = 12) -> dict:
    """Per-item results as the eval stage keeps them, for a teacher, a KD student and its CE-only control."""
    docs = _documents(n_docs)
    per_doc = {m: {"medical": {"targets": docs[:, 1].astype(int).tolist(),
                               "nll": {"transformers": (docs[:, 0] + k * docs[:, 1]).tolist()}}}
               for m, k in (("teacher", 0.0), ("kd", 0.1), ("ce", 0.2))}

    def prompts(ok: list[bool]) -> list[dict]:
        return [{"id": str(i), "strict": [o], "loose": [o], "language_pass": o, "language_skipped": False}
                for i, o in enumerate(ok)]

    instr = {"rows": [{"model": m, "set": st, "lang": st, "point": False, "prompts": prompts(ok)}
                      for m, ok in (("teacher", [True] * 8), ("kd", [True] * 6 + [False] * 2),
                                    ("ce", [True] * 4 + [False] * 4)) for st in ("en", "de")]}
    qa = {"rows": [{"model": m, "mode": mode, "items": [{"em": float(i < k), "f1": float(i < k)} for i in range(10)]}
                   for m, k in (("teacher", 8), ("kd", 6), ("ce", 5)) for mode in ("zero_shot", "one_shot")]}
    preds = [{"model": m, "benchmark": "mmlu_de", "item_id": str(i), "correct": i < k}
             for m, k in (("teacher", 3), ("kd", 3), ("ce", 2)) for i in range(12)]
    return {"per_doc": per_doc, "instr": instr, "qa": qa, "preds": preds}


def test_the_retention_table_covers_every_metric_of_the_run():
    cfg = retention.RetentionConfig(teacher="teacher", students=["kd", "ce"], control={"kd": "kd", "ce": "ce"})
    r = _run_results()
    table = [{"benchmark": "mmlu_de", "subject": "overall", "model": m, "accuracy": a, "lo": lo, "hi": hi,
              "chance": 0.25} for m, a, lo, hi in (("teacher", 0.25, 0.0, 0.5), ("kd", 0.25, 0.0, 0.5),
                                                   ("ce", 0.17, 0.0, 0.42))]
    res = retention.compute(cfg, per_doc=r["per_doc"], instr=r["instr"], mc_preds=r["preds"], mc_table=table,
                            qa=r["qa"], model_dirs={"teacher": None, "kd": None, "ce": None}, n_boot=300, seed=0)
    got = {(row["metric"], row["student"]): row["retention"]["value"] for row in res["rows"]}
    assert set(got) == {(m, s) for s in ("kd", "ce") for m in (
        "ppl_medical", "if_en", "if_de_gated", "lpr_de", "mc_mmlu_de", "qa_zero_shot_em", "qa_zero_shot_f1",
        "qa_one_shot_em", "qa_one_shot_f1")}
    assert got[("ppl_medical", "kd")] == pytest.approx(math.exp(-0.1))  # 0.1 nats per token worse
    assert got[("if_en", "kd")] == pytest.approx(0.75) and got[("qa_zero_shot_f1", "ce")] == pytest.approx(5 / 8)
    assert any("MC mmlu_de" in n and "chance" in n for n in res["notes"])
    kd = {d["metric"]: d for d in res["kd_vs_ce"]}
    assert set(kd) == {"ppl_medical", "qa_zero_shot_f1", "qa_one_shot_f1"}
    assert kd["ppl_medical"]["verdict"].startswith("KD beats CE-only")  # 0.1 nats/token better on every document
    assert res["backend"] == "transformers"


# ---------------------------------------------------------------- config errors: exit 2, one line
def _eval_config(tmp_path, **over) -> dict:
    from definemed.data.sample import SAMPLE_WEB_DIR

    cfg = {"output_dir": str(tmp_path / "out"),
           "models": {"teacher": {"path": "tiny://qwen2"}, "student": {"path": "tiny://qwen2@1"},
                      "control": {"path": "tiny://qwen2@2"}},
           "perplexity": {"sets": {"medical": {"path": str(SAMPLE_WEB_DIR), "where": {"gold_label": "medical"}}}},
           "qa": {"limit": 4},
           "retention": {"teacher": "teacher", "students": ["student"],
                         "control": {"kd": "student", "ce": "control"}}}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("change, message", [
    ({"retention": {"teacher": "nobody", "students": ["student"]}}, "retention.teacher: unknown model 'nobody'"),
    ({"retention": {"teacher": "teacher", "students": ["teacher"]}}, "cannot be its own student"),
    ({"retention": {"teacher": "teacher", "students": ["student"], "control": {"kd": "student", "ce": "student"}}},
     "kd and ce must be different"),
    ({"qa": {"models": ["nobody"]}}, "qa.models: unknown model 'nobody'"),
    ({"qa": {"models": ["student"]}}, "retention.teacher: 'teacher' is not scored by `qa`"),
    ({"retention": {"teacher": "teacher", "students": ["student"], "perplexity_set": "general"}},
     "retention.perplexity_set: 'general' is not a perplexity set"),
])
def test_bad_qa_or_retention_config_exits_2_with_one_line(tmp_path, change, message):
    from typer.testing import CliRunner

    from definemed.cli import app

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_eval_config(tmp_path)))
    assert CliRunner().invoke(app, ["validate", "eval", "--config", str(good)]).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_eval_config(tmp_path, **change)))
    res = CliRunner().invoke(app, ["validate", "eval", "--config", str(bad)])
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output


def test_a_bad_qa_file_exits_2_with_one_line(tmp_path):
    import json

    from typer.testing import CliRunner

    from definemed.cli import app

    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"id": "x", "doc_id": "d", "context": "Adrenalin hilft.", "question": "Was?",
                             "answers": [{"text": "Adrenalin", "answer_start": 3}]}) + "\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_eval_config(tmp_path, qa={"path": str(f)})))
    res = CliRunner().invoke(app, ["validate", "eval", "--config", str(bad)])
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "not the context at answer_start 3" in lines[0], res.output
