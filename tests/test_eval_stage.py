"""The `eval` stage end to end through a real endpoint: our serve app (Ray Serve LLM + vLLM CPU) hosts two tiny
candidates and the judge, the official `openai` client talks to it; held-out perplexity (vLLM and transformers)
and the merge frontier, whose point answers the instruction sets through a local engine; extractive QA zero- and
one-shot and the retention table; then a resumed run asks for nothing again. One serve app for all of it: every
launch costs about a minute on 2 cores."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from definemed.config import ConfigError, parse_config
from definemed.data.sample import SAMPLE_INSTRUCTIONS, SAMPLE_MEDQA, SAMPLE_MMLU, SAMPLE_PROMPTS, SAMPLE_WEB_DIR
from definemed.eval.config import EvalConfig
from definemed.stages import DONE_MARKER, STAGES, run_stage

# compact JSON under the judge's schema (a random judge would pad it with blank lines up to max_tokens)
ENGINE = {"max_model_len": 2048, "kv_cache_space_gib": 1,
          "extra": {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}}


def _cfg(out: Path) -> dict:
    return {
        "output_dir": str(out),
        "models": {"base": {"path": "tiny://qwen2", "engine": ENGINE},
                   "other": {"path": "tiny://qwen2@1", "engine": ENGINE}},
        "judge": {"path": "tiny://qwen2", "engine": ENGINE},  # shares the `base` deployment
        "mc": {"sources": [{"path": str(SAMPLE_MMLU), "format": "mmlu", "benchmark": "mmlu_de", "limit": 12},
                           {"path": str(SAMPLE_MEDQA), "format": "medqa", "benchmark": "medqa_de", "limit": 6}],
               "scoring": {"backend": "transformers"}},  # the vLLM scorer has its own tests (test_eval_mc)
        "pairwise": {"prompts": str(SAMPLE_PROMPTS), "limit": 3, "pairs": [["other", "base"]],
                     "generation": {"max_tokens": 24, "concurrency": 4},
                     "judge": {"max_tokens": 160, "concurrency": 4}},
        "instructions": {"prompts": str(SAMPLE_INSTRUCTIONS), "limit": 3, "splits": ["dev"],
                         "generation": {"max_tokens": 16, "concurrency": 4}},
        "perplexity": {"sets": {
            "medical": {"path": str(SAMPLE_WEB_DIR), "where": {"gold_label": "medical"}, "limit": 4},
            "general": {"path": str(SAMPLE_WEB_DIR), "where": {"gold_label": "non_medical"}, "limit": 4}},
            "max_tokens": 64},
        "frontier": {"model_a": "base", "model_b": "other", "t": [0, 0.5, 1]},
        "qa": {"limit": 3, "generation": {"max_tokens": 8, "concurrency": 4}},
        # the code path of a distillation report on two tiny models: `other` as the student and the KD model,
        # `base` as the teacher and the CE-only control
        "retention": {"teacher": "base", "students": ["other"], "control": {"kd": "other", "ce": "base"}},
        "report": {"n_boot": 200},
    }


def test_config_errors_name_the_field(tmp_path):
    bad = _cfg(tmp_path)
    bad["instructions"]["models"] = ["nobody"]
    with pytest.raises(ConfigError, match="instructions.models: unknown model 'nobody'"):
        parse_config(EvalConfig, bad)
    bad = _cfg(tmp_path)
    bad["instructions"]["generation"]["system_prompt"] = "Sei nett."
    with pytest.raises(ConfigError, match="instructions.generation.system_prompt"):
        parse_config(EvalConfig, bad)
    bad = _cfg(tmp_path)
    bad["pairwise"]["pairs"] = [["other", "nobody"]]
    with pytest.raises(ConfigError, match="pairwise.pairs: unknown model 'nobody'"):
        parse_config(EvalConfig, bad)
    bad = _cfg(tmp_path)
    bad["models"]["base"]["modelpath"] = "x"
    with pytest.raises(ConfigError, match="models.base.modelpath"):
        parse_config(EvalConfig, bad)
    bad = _cfg(tmp_path)
    bad["retention"]["students"] = ["nobody"]
    with pytest.raises(ConfigError, match="retention.students: unknown model 'nobody'"):
        parse_config(EvalConfig, bad)
    bad = _cfg(tmp_path)
    del bad["judge"]
    with pytest.raises(ConfigError, match="judge: required"):
        parse_config(EvalConfig, bad)


@pytest.mark.integration
def test_eval_stage_through_serve_app_and_resume(ray_local, tmp_path):
    out = tmp_path / "eval"
    cfg = parse_config(EvalConfig, _cfg(out))
    outputs = run_stage(STAGES["eval"], cfg)
    res = json.loads(Path(outputs["results"]).read_text())

    # MC: one valid prediction per item for both models and the frontier's point, a table with CIs
    overall = [r for r in res["mc"]["table"] if r["subject"] == "overall"]
    assert {(r["benchmark"], r["model"], r["n"]) for r in overall} == {
        (b, m, n) for b, n in (("mmlu_de", 12), ("medqa_de", 6)) for m in ("base", "other", "slerp-t0.5")}
    # perplexity: both backends agree (bf16 vLLM vs fp32 transformers); the frontier: parents and the point,
    # every one with the instruction columns (the point answered through a local engine)
    rows = res["perplexity"]["table"]
    assert {(r["model"], r["set"], r["backend"]) for r in rows} >= {
        (m, s, b) for m in ("base", "other") for s in ("medical", "general") for b in ("vllm", "transformers")}
    assert all(r["agree"] for r in rows if r["model"] in ("base", "other")), rows
    fr = res["frontier"]["rows"]
    assert [(r["model"], r["t"]) for r in fr] == [("base", 0), ("slerp-t0.5", 0.5), ("other", 1)]
    for r in fr:
        assert r["ppl_medical"] > 0 and 0 <= r["mc_accuracy"] <= 1
        assert 0 <= r["if_en"] <= 1 and 0 <= r["if_de_gated"] <= 1
        assert math.isnan(r["lpr_de"]) or 0 <= r["lpr_de"] <= 1  # nan: no answer had a line of 5 words
    points = [r for r in res["instructions"]["rows"] if r["point"]]
    assert {(r["model"], r["set"]) for r in points} == {("slerp-t0.5", "de"), ("slerp-t0.5", "en")}
    assert not (out / "frontier" / "slerp-t0.5").exists()  # merged weights dropped once scored
    # pairwise: 3 prompts x 2 orders judged; every pair is a win, tie, loss or unparsed
    pw = res["pairwise"]
    assert pw["judgments"] == 6
    # schema-constrained output through the serve app: even a random judge states a verdict every time
    assert pw["unparsed_judgments"] == 0
    (comp,) = pw["comparisons"]
    assert comp["n"] == 3 and comp["win"] + comp["tie"] + comp["loss"] == 3
    assert 0.0 <= comp["win_rate"]["value"] <= 1.0
    answers = json.loads((out / "answers.json").read_text())["answers"]
    assert set(answers) == {"base", "other"} and all(len(a) == 3 for a in answers.values())
    # failure modes: the study-shaped row per model, on the clinical answers and on the German instruction set
    fm = {(r["set"], r["model"]): r for r in res["failure_modes"]}
    assert set(fm) == {(s, m) for s in ("clinical", "instructions-de") for m in ("base", "other")}
    assert all(r["answers"] == 3 for r in fm.values()) and all("lpr" in r for r in fm.values())
    # instruction following: every model x set, the four accuracies, the German gate, LPR and lengths
    ins = {(r["model"], r["set"]): r for r in res["instructions"]["rows"] if not r["point"]}
    assert set(ins) == {(m, s) for m in ("base", "other") for s in ("de", "en")}
    for (m, s), r in ins.items():
        assert r["n"] == 3 and len(r["prompts"]) == 3 and r["tokens"]["value"] <= 16
        for k in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            assert 0 <= r[k]["value"] <= 1
        assert ("gated" in r) == (s == "de") or r["lang"] == "en"
        assert r["prompt_strict"]["value"] <= r["prompt_loose"]["value"]
    assert {"base", "other", "slerp-t0.5"} == set(json.loads((out / "instruction_answers.json").read_text())["answers"])
    # extractive QA: every model x mode answered the 3 scored items through the chat route, EM <= F1 per item
    qa = {(r["model"], r["mode"]): r for r in res["qa"]["rows"]}
    assert set(qa) == {(m, k) for m in ("base", "other") for k in ("zero_shot", "one_shot")}
    for r in qa.values():
        assert r["n"] == 3 and all(0 <= p["em"] <= p["f1"] <= 1 for p in r["items"])
    assert set(res["qa"]["exemplars"]) == set(res["qa"]["items"]) and not set(res["qa"]["exemplars"].values()) & \
        set(res["qa"]["items"])
    # retention: student / teacher on every metric of the run, parameters, KD vs CE-only with a verdict
    ret = json.loads((out / "retention.json").read_text())
    assert {r["metric"] for r in ret["rows"]} == {
        "ppl_medical", "ppl_general", "if_en", "if_de_gated", "lpr_de", "mc_mmlu_de", "mc_medqa_de",
        *[f"qa_{k}_{s}" for k in ("zero_shot", "one_shot") for s in ("em", "f1")]}
    p_row = next(r for r in ret["rows"] if r["metric"] == "ppl_medical")
    assert p_row["retention"]["value"] == pytest.approx(p_row["teacher_value"] / p_row["student_value"])
    assert [p["parameters"] > 0 for p in ret["parameters"]] == [True, True]
    assert {d["metric"] for d in ret["kd_vs_ce"]} == {"ppl_medical", "qa_zero_shot_f1", "qa_one_shot_f1"}
    assert all(d["verdict"].startswith(("KD beats", "KD does not beat")) and "95% CI" in d["verdict"]
               for d in ret["kd_vs_ce"])
    # report: tiny models -> says the numbers carry no meaning; plots and lineage beside it
    md = Path(outputs["report_md"]).read_text()
    assert "carry no meaning" in md and "## Multiple choice" in md and "## Pairwise win-rate" in md
    assert "## Failure modes" in md and "## Instruction following" in md and "lineage.json" in md
    assert "## Merge frontier" in md and "IF de, language-gated %" in md
    assert "## Extractive QA (German)" in md and "## Retention" in md and "KD against the CE-only control" in md
    for k in ("plot_mc", "plot_win_rate", "plot_verbosity", "plot_instructions", "plot_frontier",
              "plot_frontier_if", "plot_perplexity", "plot_qa", "plot_retention"):
        assert Path(outputs[k]).stat().st_size > 1000
    assert (out / "lineage.json").exists() and (out / DONE_MARKER).exists()
    assert "<table>" in Path(outputs["report_html"]).read_text()

    # resume: a rerun of the unfinished stage asks neither the candidates nor the judge again (no serve app
    # is started: every request is cached) and recomputes the same report
    judged = (out / "cache" / "judgments.jsonl").read_text()
    generated = (out / "cache" / "answers.jsonl").read_text()
    instructed = (out / "cache" / "instructions.jsonl").read_text()
    asked = (out / "cache" / "qa.jsonl").read_text()
    (out / DONE_MARKER).unlink()
    again = STAGES["eval"].run_fn()(cfg)
    assert (out / "cache" / "judgments.jsonl").read_text() == judged
    assert (out / "cache" / "answers.jsonl").read_text() == generated
    assert (out / "cache" / "instructions.jsonl").read_text() == instructed
    assert (out / "cache" / "qa.jsonl").read_text() == asked
    assert json.loads(Path(again["results"]).read_text())["pairwise"]["comparisons"][0]["n"] == comp["n"]
