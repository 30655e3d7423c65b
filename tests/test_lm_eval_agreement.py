"""lm-evaluation-harness and our MC scorer pick the same letter for every bundled MMLU-de item (gemma-3-270m).

lm-eval scores our exported task (definemed.eval.lm_eval_task: our prompts, letters " A".." D") with its own
request building and tokenisation; ours appends the letter token ids to the prompt. Both run the same fp32
weights in transformers, so any disagreement is a prompt or tokenisation difference, not numerics. lm-eval is a
dev extra only.

lm-eval scores every letter with its own forward pass (4x ours), which is minutes on 2 CPU cores for all 144
items, so CI checks the first item of every subject; DEFINEMED_LM_EVAL_ALL=1 checks every item (see
docs/real-model.md for the full run).
"""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


def test_lm_eval_and_our_scorer_pick_the_same_letters(real_gemma, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from definemed.data.loaders import MCSourceConfig, load_mc_items
    from definemed.data.sample import SRC_DIR
    from definemed.eval.lm_eval_task import export
    from definemed.eval.mc import MCPromptConfig, MCScoringConfig, TransformersScorer, build_prompts, predict

    per_subject = None if os.environ.get("DEFINEMED_LM_EVAL_ALL") == "1" else 1
    export(tmp_path / "tasks", benchmarks=("mmlu_de",), per_subject=per_subject)
    res = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": real_gemma, "dtype": "float32", "add_bos_token": True}, device="cpu",
        tasks=["definemed_mmlu_de"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        batch_size=8, log_samples=True, bootstrap_iters=0)
    theirs = {}
    for s in res["samples"]["definemed_mmlu_de"]:
        lls = [r[0] for r in s["filtered_resps"]]
        theirs[s["doc"]["id"]] = "ABCD"[max(range(len(lls)), key=lls.__getitem__)]

    items = load_mc_items(MCSourceConfig(path=str(SRC_DIR / "mmlu_de.jsonl"), format="mmlu", benchmark="mmlu_de"))
    prompts = dict(zip([it.id for it in items], build_prompts(items, MCPromptConfig())))  # shots from all items
    items = [it for it in items if it.id in theirs]
    scorer = TransformersScorer.from_path(real_gemma, chat_template=False, max_len=2048)
    preds = predict("base", items, [prompts[it.id] for it in items], MCScoringConfig(backend="transformers"),
                    scorer=scorer)
    ours = {p.item_id: p.prediction for p in preds}
    assert len(ours) == len(theirs) == (144 if per_subject is None else 6 * per_subject)
    differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not differ, differ
