"""MC scoring through the vLLM CPU engine: one valid prediction per item, and planted answers are found.

A random tiny model cannot read anything from its context, so the planted-answer test uses a tiny Qwen2 whose
first attention head is wired by hand to attend to answer-letter tokens (" A", " B", ...) in the context and
copy them to the output: the model can only score the planted letter highest by finding it in the prompt.
Planting every letter in turn, wrong ones included, shows the scorer follows the plant rather than a bias.
"""
from __future__ import annotations

import numpy as np
import pytest

from definemed.data.loaders import load_mc_items, sample_mc_config
from definemed.eval.mc import (MCPromptConfig, MCScoringConfig, VllmScorer, accuracy_table, build_prompt,
                               build_prompts, parse_letter, predict, select_shots)


@pytest.fixture(scope="module")
def items():
    return load_mc_items(sample_mc_config("mmlu")) + load_mc_items(sample_mc_config("medqa"))


def build_copy_model(src: str, out, letters: str = "ABCDE", beta: float = 12.0, alpha: float = 4.0) -> str:
    """Tiny Qwen2 with one hand-wired 'answer copy' head: constant query on the slowest RoPE pair (so position
    barely matters), keys large only for letter tokens, values/outputs copy the attended embedding into the
    residual; every other attention and MLP output is zeroed. Tied embeddings turn that into a high logit for
    the letter seen in context."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hd = m.config.hidden_size // m.config.num_attention_heads
    emb = m.model.embed_tokens.weight.data
    ids = [tok.encode(" " + letter, add_special_tokens=False)[0] for letter in letters]
    x = emb[ids] / emb[ids].pow(2).mean(-1, keepdim=True).sqrt()  # as input_layernorm sees them
    u = (x / x.norm(dim=-1, keepdim=True)).sum(0)
    slow = hd // 2 - 1
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            layer.mlp.down_proj.weight.zero_()
            a = layer.self_attn
            a.o_proj.weight.zero_()
            if i > 0:
                continue
            a.q_proj.weight.zero_(), a.q_proj.bias.zero_()
            a.q_proj.bias[slow] = beta
            a.k_proj.weight.zero_(), a.k_proj.bias.zero_()
            a.k_proj.weight[slow] = u
            a.v_proj.weight.zero_(), a.v_proj.bias.zero_()
            a.v_proj.weight[:, :hd] = torch.eye(hd)
            a.o_proj.weight[:hd, :hd] = alpha * torch.eye(hd)
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_prompts_are_german_and_shots_exclude_the_item(items):
    p = build_prompt(items[0])
    assert p.startswith("Die folgenden Fragen sind Multiple-Choice-Fragen") and p.endswith("Antwort:")
    assert "Frage:" in p and "\nA. " in p
    shots = select_shots(items, 3, seed=0)
    assert all(len(v) == 3 and all(s.id != k for s in v) for k, v in shots.items())
    assert parse_letter("Die Antwort ist C.", "ABCD") == "C" and parse_letter("keine Ahnung", "ABCD") is None


def test_accuracy_table_reports_chance_and_the_report_warns_only_when_no_model_beats_it():
    from definemed.eval.mc import MCPrediction
    from definemed.eval.report import chance_note

    def preds(model, n_right, n=40, options=4):
        return [MCPrediction(model, f"q{i}", "mmlu_de", "anatomy", "A", "A" if i < n_right else "B", i < n_right,
                             n_options=options) for i in range(n)]

    guessing = accuracy_table(preds("base", 10) + preds("cpt", 11), n_boot=200)
    assert {r["chance"] for r in guessing} == {0.25}
    assert chance_note(guessing) is not None  # 25% and 27.5% of 40 items: both CIs contain 25%
    knows = accuracy_table(preds("base", 10) + preds("cpt", 36), n_boot=200)
    assert chance_note(knows) is None  # 90% clears chance
    # predictions saved before n_options was recorded: loglik ones still give it through their logprobs
    old = [MCPrediction("m", "q", "medqa_de", "s", "A", "A", True, [-1.0] * 5)]
    assert accuracy_table(old, n_boot=10)[0]["chance"] == pytest.approx(0.2)


@pytest.mark.integration
def test_every_item_gets_exactly_one_valid_prediction(vllm_qwen2, items):
    # every MedQA item and every MMLU subject; zero-shot prompts fit the fixture's 256-token context
    subset = items[::3]

    def score(llm, subset):
        prompts = build_prompts(subset, MCPromptConfig(shots=0))
        loglik = predict("base", subset, prompts, MCScoringConfig(), scorer=VllmScorer(llm))
        gen = predict("base", subset[:12], build_prompts(subset[:12], MCPromptConfig(), generate=True),
                      MCScoringConfig(mode="generate", max_gen_tokens=4), llm=llm)
        return loglik, gen

    preds, gen = vllm_qwen2(score, subset)
    assert [p.item_id for p in preds] == [it.id for it in subset]
    assert all(p.prediction in it.letters for p, it in zip(preds, subset))
    assert all(len(p.logprobs) == len(it.letters) and all(np.isfinite(p.logprobs)) for p, it in zip(preds, subset))
    assert all(lp < 0 for p in preds for lp in p.logprobs)
    rows = accuracy_table(preds, n_boot=200)
    overall = {r["benchmark"]: r for r in rows if r["subject"] == "overall"}
    assert set(overall) == {"mmlu_de", "medqa_de"}
    assert sum(r["n"] for r in overall.values()) == len(subset)
    # generate-and-parse mode: one record per item; a letter or None (counted as unparsed), nothing else
    assert len(gen) == 12 and all(p.prediction is None or p.prediction in "ABCDE" for p in gen)


@pytest.mark.integration
def test_scorer_finds_planted_answer_and_follows_a_wrong_plant(in_own_process, tmp_path_factory, tiny_qwen2,
                                                              items):
    def planted_scores(path: str, items: list) -> dict:
        from definemed.engine import EngineConfig, make_llm

        llm = make_llm(path, EngineConfig(max_model_len=1024), sole_engine=True)
        tok = llm.get_tokenizer()
        letter_tokens = {tok.encode(" " + c, add_special_tokens=False)[0] for c in "ABCDE"}
        # Items whose own text contains no answer-letter token (" A" as in "A. iliaca" would be copied too).
        clean = [it for it in items if not set(tok.encode(build_prompt(it))) & letter_tokens]
        chosen = [it for it in clean if it.benchmark == "mmlu_de"][:5] + \
                 [it for it in clean if it.benchmark == "medqa_de"][:3]
        cases, prompts = [], []
        for it in chosen:
            for planted in range(len(it.letters)):  # the right letter and every wrong one
                shot = it.model_copy(update={"answer": planted})
                cases.append(planted)
                prompts.append(build_prompt(it, [shot, shot]))  # few-shot examples = the test item, answered
        scorer = VllmScorer(llm)
        lps = scorer.letter_logprobs(prompts, [it.letters for it in chosen for _ in it.letters])
        # without a plant the same model has nothing to copy and is not always right
        zero = predict("copy", chosen, build_prompts(chosen, MCPromptConfig()), MCScoringConfig(), scorer=scorer)
        return {"chosen": len(chosen), "planted": cases, "picked": [int(np.argmax(lp)) for lp in lps],
                "truncated": scorer.truncated, "zero_correct": sum(p.correct for p in zero)}

    path = build_copy_model(tiny_qwen2, tmp_path_factory.mktemp("copy_model"))
    res = in_own_process(planted_scores, path, items)
    assert res["chosen"] == 8
    assert res["truncated"] == 0
    assert res["picked"] == res["planted"]
    assert res["zero_correct"] < res["chosen"]
