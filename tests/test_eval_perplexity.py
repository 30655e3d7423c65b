"""Held-out perplexity, the FineMed-de split and the merge frontier: the parts that need no model."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from definemed.eval.frontier import FrontierConfig, frontier_rows, plot_frontier
from definemed.eval.perplexity import PerplexitySetConfig, load_set, summarize, token_weighted_ppl
from definemed.train.split import HeldoutConfig, is_heldout, trained_ids, write_heldout


def test_split_is_seeded_stable_and_near_the_fraction():
    ids = [f"doc-{i}" for i in range(4000)]
    held = [i for i in ids if is_heldout(i, 0.15, seed=0)]
    assert 0.13 < len(held) / len(ids) < 0.17
    assert held == [i for i in reversed(ids) if is_heldout(i, 0.15, seed=0)][::-1]  # order does not matter
    assert held != [i for i in ids if is_heldout(i, 0.15, seed=1)]  # the seed does


def test_heldout_file_and_trained_ids_partition_the_input(tmp_path):
    ids = [f"d{i}" for i in range(200)]
    pq.write_table(pa.table({"id": ids, "text": [f"Text {i}" for i in ids]}), tmp_path / "in.parquet")
    from definemed.data.loaders import parquet_files

    files, fs = parquet_files(str(tmp_path / "in.parquet"))
    rec = write_heldout(files, fs, "text", HeldoutConfig(fraction=0.2, seed=3), tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"input": str(tmp_path / "in.parquet"), **rec}))
    held = set(pq.read_table(tmp_path / "heldout.parquet").column("id").to_pylist())
    assert held == set(rec["heldout_ids"]) and rec["heldout_docs"] == len(held) > 0
    assert trained_ids(tmp_path) == set(ids) - held


def test_token_weighted_perplexity_is_exp_of_total_nll_over_total_tokens():
    nll, n = [10.0, 30.0, 20.0], [5, 10, 10]
    est = token_weighted_ppl(nll, n, n_boot=200, seed=0)
    assert est.value == pytest.approx(math.exp(60 / 25))
    assert est.lo <= est.value <= est.hi and est.n == 3
    assert token_weighted_ppl(nll, n, n_boot=200, seed=0) == est  # seeded


def test_backends_agree_only_within_the_tolerance():
    per_doc = {"m": {"medical": {"targets": [10, 10], "nll": {"vllm": [20.0, 21.0], "transformers": [20.1, 21.0]}},
                     "general": {"targets": [10], "nll": {"vllm": [20.0], "transformers": [25.0]}}}}
    rows = {(r["set"], r["backend"]): r for r in summarize(per_doc, n_boot=50, seed=0, tolerance=0.01)}
    assert rows[("medical", "vllm")]["agree"] and not rows[("general", "vllm")]["agree"]


def test_general_set_filters_drops_trained_docs_and_limits(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": ["eins", "zwei", "  ", "vier"],
                             "gold_label": ["non_medical", "non_medical", "non_medical", "medical"]}),
                   tmp_path / "web.parquet")
    pack = tmp_path / "pack"
    pack.mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["eins"]}), tmp_path / "finemed.parquet")
    (pack / "split.json").write_text(json.dumps({"input": str(tmp_path / "finemed.parquet"), "id_column": "id",
                                                 "fraction": 1e-9, "seed": 0}))
    docs = load_set(PerplexitySetConfig(path=str(tmp_path / "web.parquet"), where={"gold_label": "non_medical"},
                                        exclude_trained=str(pack)))
    assert docs == [("b", "zwei")]  # a was trained on, c is blank, d is medical


def test_dev_and_test_halves_of_a_set_partition_it_as_the_selection_split_does(tmp_path):
    """Whatever selected on dev (the distillation sweep, scripts/distill_sweep.py) is reported on `split: test`:
    the two halves are disjoint, cover the set, and are the documents dev_test_split gives."""
    from definemed.train.split import dev_test_split

    ids = [f"doc-{i:03d}" for i in range(60)]
    pq.write_table(pa.table({"id": ids, "text": [f"Text {i}" for i in ids]}), tmp_path / "held.parquet")
    whole = load_set(PerplexitySetConfig(path=str(tmp_path / "held.parquet")))
    dev = load_set(PerplexitySetConfig(path=str(tmp_path / "held.parquet"), split="dev"))
    test = load_set(PerplexitySetConfig(path=str(tmp_path / "held.parquet"), split="test"))
    assert sorted(dev + test) == whole and not set(dev) & set(test) and 15 < len(dev) < 45
    assert {i for i, _ in dev} == {i for i, _ in dev_test_split(whole, 0, "dev")}
    other = load_set(PerplexitySetConfig(path=str(tmp_path / "held.parquet"), split="dev", split_seed=1))
    assert other != dev  # the seed moves documents


def test_frontier_rows_reuse_the_parents_at_t0_and_t1(tmp_path):
    cfg = FrontierConfig(model_a="base", model_b="cpt", t=[0, 0.5, 1], marked=["merged"])
    ppl = []
    for m, med, gen in [("base", 30, 26), ("cpt", 25, 26.5), ("slerp-t0.5", 27, 26.1), ("merged", 26, 26.2)]:
        for s, v in (("medical", med), ("general", gen)):
            ppl.append({"model": m, "set": s, "backend": "transformers", "value": v, "lo": v - 1, "hi": v + 1})
    preds = [{"model": "base", "correct": True}, {"model": "base", "correct": False}]
    rows = frontier_rows(cfg, ppl, preds)
    assert [(r["model"], r["t"]) for r in rows] == [("base", 0), ("slerp-t0.5", 0.5), ("cpt", 1), ("merged", None)]
    assert rows[0]["ppl_medical"] == 30 and rows[0]["mc_accuracy"] == 0.5 and np.isnan(rows[1]["mc_accuracy"])
    assert plot_frontier(rows, tmp_path / "f.png").stat().st_size > 1000


def _eval_cfg(tmp_path, **over):
    from definemed.config import parse_config
    from definemed.eval.config import EvalConfig

    web = tmp_path / "web.parquet"
    if not web.exists():
        pq.write_table(pa.table({"id": ["a"], "text": ["eins"]}), web)
    data = {"output_dir": str(tmp_path / "eval"), "models": {"base": {"path": "real://gemma-3-270m"}},
            "perplexity": {"sets": {"general": {"path": str(web)}}}, **over}
    return parse_config(EvalConfig, data, source="eval.yaml")


def test_eval_config_accepts_real_refs_and_rejects_bad_frontier(tmp_path):
    from definemed.config import ConfigError

    assert _eval_cfg(tmp_path).perplexity_models() == ["base"]
    with pytest.raises(ConfigError, match="frontier.model_b: 'cpt'"):
        _eval_cfg(tmp_path, frontier={"model_a": "base", "model_b": "cpt"})
    with pytest.raises(ConfigError, match="models.base.path.*unknown model 'real://nope'"):
        _eval_cfg(tmp_path, models={"base": {"path": "real://nope"}})


def test_chatting_with_a_model_without_chat_template_is_rejected_at_validation(tmp_path):
    from definemed.config import ConfigError

    plain = tmp_path / "plain-model"
    plain.mkdir()
    (plain / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "category": "patient_question", "prompt": "Was ist Fieber?"}) + "\n")
    pairwise = {"prompts": str(prompts), "pairs": [["plain", "base"]]}
    with pytest.raises(ConfigError) as e:
        _eval_cfg(tmp_path, models={"base": {"path": "real://gemma-3-270m"}, "plain": {"path": str(plain)}},
                  judge={"path": "real://gemma-3-270m"}, pairwise=pairwise)
    assert "models.plain.path" in str(e.value) and "no chat template" in str(e.value) and "\n" not in str(e.value)


def test_report_renders_perplexity_and_frontier_sections_with_plots(tmp_path):
    from definemed.eval.report import write_report

    cfg = _eval_cfg(tmp_path, models={"base": {"path": "real://gemma-3-270m"}, "cpt": {"path": "real://gemma-3-270m"}},
                    frontier={"model_a": "base", "model_b": "cpt", "t": [0, 0.5, 1]})
    per_doc = {m: {s: {"targets": [10, 12], "nll": {"vllm": [30.0 + k, 33.0], "transformers": [30.0 + k, 33.1]}}
                   for s in ("medical", "general")} for k, m in enumerate(["base", "cpt", "slerp-t0.5"])}
    rows = summarize(per_doc, n_boot=50, seed=0, tolerance=0.01)
    results = {"perplexity": {"table": rows, "max_tokens": 512, "backends": ["vllm", "transformers"], "sets": {},
                              "tolerance": 0.01},
               "frontier": {"rows": frontier_rows(cfg.frontier, rows, []), **cfg.frontier.model_dump()}}
    paths = write_report(cfg, results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Held-out perplexity" in md and "## Merge frontier" in md and "slerp-t0.5" in md
    assert (tmp_path / "plots" / "frontier.png").stat().st_size > 1000 and "plot_perplexity" in paths
