"""The tiny offline models load in transformers and in the vLLM CPU engine, and generate."""
import pytest
import torch


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_causal_lm_transformers_generate(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from definemed.models import resolve_model

    path = resolve_model(f"tiny://{name}")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.hidden_size // model.config.num_attention_heads == 64  # vLLM CPU kernel constraint
    prompt = tok.apply_chat_template([{"role": "user", "content": "Was ist eine Anämie?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape[1] == ids.input_ids.shape[1] + 6


def test_chat_templates_match_their_families(tiny_qwen2, tiny_mistral):
    from transformers import AutoTokenizer

    msgs = [{"role": "user", "content": "Hallo"}]
    q = AutoTokenizer.from_pretrained(tiny_qwen2).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    m = AutoTokenizer.from_pretrained(tiny_mistral).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert q == "<|im_start|>user\nHallo<|im_end|>\n<|im_start|>assistant\n"
    assert m == "<s>[INST] Hallo [/INST]"


def test_tokenizer_is_trained_on_german(tiny_qwen2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    assert tok.decode(tok("Blutdruck und Patientin")["input_ids"]) == "Blutdruck und Patientin"
    # A German-trained BPE needs far fewer tokens for German than bytes.
    assert len(tok("Die Patientin erhält täglich Ramipril.")["input_ids"]) < 20


def test_xlmr_classifier_forward(tiny_xlmr):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_xlmr)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_xlmr)
    enc = tok(["Der Patient hat Fieber.", "Heute regnet es."], padding=True, return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tok.cls_token_id
    logits = model(**enc).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert model.config.id2label[1] == "medical"


def test_build_is_cached_and_seed_changes_weights():
    from safetensors.torch import load_file

    from definemed.models import resolve_model

    a, a2, b = resolve_model("tiny://qwen2"), resolve_model("tiny://qwen2"), resolve_model("tiny://qwen2@1")
    assert a == a2 and a != b
    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert wa.keys() == wb.keys()
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], wb["model.layers.0.mlp.up_proj.weight"])


def test_real_paths_pass_through(tmp_path):
    from definemed.models import resolve_model

    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())


@pytest.mark.integration
def test_vllm_cpu_engine_generates_what_the_model_predicts(vllm_qwen2, tiny_qwen2):
    from tests.hf_check import assert_greedy_tokens_match_transformers

    def chat(llm):
        from vllm import SamplingParams

        outs = llm.chat([[{"role": "user", "content": "Was ist Bluthochdruck?"}]] * 2,
                        SamplingParams(max_tokens=8, temperature=0))
        return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]

    (prompt, out), (prompt2, out2) = vllm_qwen2(chat)
    assert prompt == prompt2 and out == out2  # greedy: the same prompt gives the same tokens
    assert_greedy_tokens_match_transformers(tiny_qwen2, prompt, out)
