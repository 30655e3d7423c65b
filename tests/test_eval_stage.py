"""The `eval` stage end to end through a real endpoint: our serve app (Ray Serve LLM + vLLM CPU) hosts two tiny
candidates and the judge, the official `openai` client talks to it; then a resumed run asks for nothing again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from definemed.config import ConfigError, parse_config
from definemed.data.sample import SAMPLE_MEDQA, SAMPLE_MMLU, SAMPLE_PROMPTS
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
        "report": {"n_boot": 200},
    }


def test_config_errors_name_the_field(tmp_path):
    bad = _cfg(tmp_path)
    bad["pairwise"]["pairs"] = [["other", "nobody"]]
    with pytest.raises(ConfigError, match="pairwise.pairs: unknown model 'nobody'"):
        parse_config(EvalConfig, bad)
    bad = _cfg(tmp_path)
    bad["models"]["base"]["modelpath"] = "x"
    with pytest.raises(ConfigError, match="models.base.modelpath"):
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

    # MC: one valid prediction per item for both models, a table with CIs
    overall = [r for r in res["mc"]["table"] if r["subject"] == "overall"]
    assert {(r["benchmark"], r["model"], r["n"]) for r in overall} == {
        ("mmlu_de", "base", 12), ("mmlu_de", "other", 12), ("medqa_de", "base", 6), ("medqa_de", "other", 6)}
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
    # failure modes: the study-shaped row per model
    fm = {r["model"]: r for r in res["failure_modes"]}
    assert set(fm) == {"base", "other"} and all(r["answers"] == 3 for r in fm.values())
    # report: tiny models -> says the numbers carry no meaning; plots and lineage beside it
    md = Path(outputs["report_md"]).read_text()
    assert "carry no meaning" in md and "## Multiple choice" in md and "## Pairwise win-rate" in md
    assert "## Failure modes" in md and "lineage.json" in md
    for k in ("plot_mc", "plot_win_rate", "plot_verbosity"):
        assert Path(outputs[k]).stat().st_size > 1000
    assert (out / "lineage.json").exists() and (out / DONE_MARKER).exists()
    assert "<table>" in Path(outputs["report_html"]).read_text()

    # resume: a rerun of the unfinished stage asks neither the candidates nor the judge again (no serve app
    # is started: every request is cached) and recomputes the same report
    judged = (out / "cache" / "judgments.jsonl").read_text()
    generated = (out / "cache" / "answers.jsonl").read_text()
    (out / DONE_MARKER).unlink()
    again = STAGES["eval"].run_fn()(cfg)
    assert (out / "cache" / "judgments.jsonl").read_text() == judged
    assert (out / "cache" / "answers.jsonl").read_text() == generated
    assert json.loads(Path(again["results"]).read_text())["pairwise"]["comparisons"][0]["n"] == comp["n"]
