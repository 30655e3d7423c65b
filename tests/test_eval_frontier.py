"""Integration: the eval stage's held-out perplexity (vLLM and transformers) and merge frontier, end to end on
tiny models (numbers meaningless; the code path and the report are what is checked)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from definemed.stages import STAGES, run_stage

pytestmark = pytest.mark.integration


def test_perplexity_and_frontier_through_the_eval_stage(ray_local, tiny_qwen2, tmp_path):
    from definemed.data.sample import SAMPLE_MMLU, SAMPLE_WEB_DIR

    engine = {"max_model_len": 256}
    cfg = STAGES["eval"].config_model().model_validate({
        "output_dir": str(tmp_path / "eval"),
        "models": {"base": {"path": "tiny://qwen2", "engine": engine},
                   "cpt": {"path": "tiny://qwen2@1", "engine": engine}},
        "mc": {"sources": [{"path": str(SAMPLE_MMLU), "format": "mmlu", "benchmark": "mmlu_de",
                            "subjects": ["anatomy"]}],
               "scoring": {"backend": "transformers"}},
        "perplexity": {"sets": {
            "medical": {"path": str(SAMPLE_WEB_DIR), "where": {"gold_label": "medical"}, "limit": 4},
            "general": {"path": str(SAMPLE_WEB_DIR), "where": {"gold_label": "non_medical"}, "limit": 4}},
            "max_tokens": 64},
        "frontier": {"model_a": "base", "model_b": "cpt", "t": [0, 0.5, 1]},
        "report": {"n_boot": 100}})
    out = run_stage(STAGES["eval"], cfg)
    res = json.loads(Path(out["results"]).read_text())
    rows = res["perplexity"]["table"]
    assert {(r["model"], r["set"], r["backend"]) for r in rows} >= {
        (m, s, b) for m in ("base", "cpt") for s in ("medical", "general") for b in ("vllm", "transformers")}
    assert all(r["agree"] for r in rows if r["model"] in ("base", "cpt")), rows  # bf16 vLLM vs fp32 transformers
    assert [(r["model"], r["t"]) for r in res["frontier"]["rows"]] == [("base", 0), ("slerp-t0.5", 0.5), ("cpt", 1)]
    mid = res["frontier"]["rows"][1]
    assert mid["ppl_medical"] > 0 and 0 <= mid["mc_accuracy"] <= 1
    md = Path(out["report_md"]).read_text()
    assert "## Merge frontier" in md and "carry no meaning" in md
    assert Path(out["plot_frontier"]).stat().st_size > 1000
    assert not (tmp_path / "eval" / "frontier" / "slerp-t0.5").exists()  # merged weights dropped once scored
